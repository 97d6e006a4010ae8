"""ModelInferRequest -> the core's InferenceRequest, and InferenceResult -> ModelInferResponse.

Request parameters read: `priority` (integer; 1 is the highest level, 0 the model's default), `version` (a version
pin like `model_version`, integer or string) and `timeout` (integer microseconds; the request fails with
DEADLINE_EXCEEDED if its result is not ready by then; the call's own gRPC deadline applies too, whichever comes
first). Sequence parameters are refused: tensorgate has no sequence batcher. Requested-output parameters read:
`classification` (integer k: the top k classes as BYTES "value:index[:label]") and `binary_data` (bool): raw output
bytes by default; typed `contents` when every requested output sets it false (or the request sets
`binary_data_output` false). A gRPC response carries either raw_output_contents for every output or typed contents
for every output, so a mix is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from tensorgate.client.tensors import dtype_name
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.server.api.oip.tensors import classify, decode_inputs, encode_raw, encode_typed
from tensorgate.server.errors import InvalidInputError
from tensorgate.server.inference import InferenceRequest, InferenceResult

__all__ = ["OutputOptions", "decode_request", "encode_response", "parse_version"]

Parameters = Mapping[str, pb.InferParameter]
#: Request parameters that ask for sequence batching, which tensorgate does not do.
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


@dataclass(slots=True)
class OutputOptions:
    """How the response presents the outputs: typed or raw, and which outputs become classifications."""

    typed: bool = False
    #: Output name -> k, for outputs that asked for the top k classes.
    classification: dict[str, int] = field(default_factory=dict)


def parse_version(text: str, what: str = "model_version") -> int | None:
    """A version string: "" is the server's choice (None); otherwise a positive decimal integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise InvalidInputError(f"{what} {text!r} is not a version number (a positive integer, or empty)")
    return int(text)


def _integer(where: str, key: str, parameter: pb.InferParameter) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    if choice == "int64_param":
        return parameter.int64_param
    if choice == "uint64_param":
        return parameter.uint64_param
    raise InvalidInputError(f"{where} parameter {key!r} must be an integer (int64_param), got {choice or 'nothing'}")


def _boolean(where: str, key: str, parameter: pb.InferParameter) -> bool:
    if parameter.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInputError(f"{where} parameter {key!r} must be a bool (bool_param)")
    return parameter.bool_param


def _version(request: pb.ModelInferRequest) -> int | None:
    """`model_version`, or the request parameter "version" (a pin for gray releases; either form, not both)."""
    version = parse_version(request.model_version)
    if "version" not in request.parameters:
        return version
    parameter = request.parameters["version"]
    if parameter.WhichOneof("parameter_choice") == "string_param":
        pinned = parse_version(parameter.string_param, "request parameter 'version'")
    else:
        pinned = _integer("request", "version", parameter)
        if pinned <= 0:
            raise InvalidInputError(f"request parameter 'version' must be a positive version number, got {pinned}")
    if version is not None and pinned is not None and pinned != version:
        raise InvalidInputError(f"model_version {version} and request parameter 'version' {pinned} disagree")
    return version if pinned is None else pinned


def _deadline(parameters: Parameters, call_deadline: float | None) -> float | None:
    if "timeout" not in parameters:
        return call_deadline
    timeout = _integer("request", "timeout", parameters["timeout"])
    if timeout < 0:
        raise InvalidInputError(f"request parameter 'timeout' must be >= 0 microseconds, got {timeout}")
    if timeout == 0:
        return call_deadline
    deadline = time.monotonic() + timeout / 1e6
    return deadline if call_deadline is None else min(deadline, call_deadline)


def _output_options(request: pb.ModelInferRequest) -> tuple[tuple[str, ...] | None, OutputOptions]:
    options = OutputOptions()
    names: list[str] = []
    binary: dict[str, bool] = {}
    for output in request.outputs:
        name = output.name
        if name in names:
            raise InvalidInputError(f"output {name!r} is requested more than once")
        names.append(name)
        parameters = output.parameters
        if "classification" in parameters:
            count = _integer(f"output {name!r}", "classification", parameters["classification"])
            if count < 0:
                raise InvalidInputError(f"output {name!r}: classification must be >= 0, got {count}")
            if count:
                options.classification[name] = count
        if "binary_data" in parameters:
            binary[name] = _boolean(f"output {name!r}", "binary_data", parameters["binary_data"])
    if "binary_data_output" in request.parameters:
        options.typed = not _boolean("request", "binary_data_output", request.parameters["binary_data_output"])
        mixed = any(raw_data == options.typed for raw_data in binary.values())
    else:
        options.typed = bool(binary) and not any(binary.values())
        mixed = (options.typed and len(binary) != len(names)) or (any(binary.values()) and not all(binary.values()))
    if mixed:
        raise InvalidInputError(
            "outputs disagree on binary_data: a gRPC response carries raw data for every output or typed contents "
            "for every output (binary_data false on all requested outputs, or binary_data_output false)"
        )
    return (tuple(names) or None), options


def decode_request(
    request: pb.ModelInferRequest, *, request_id: str, call_deadline: float | None
) -> tuple[InferenceRequest, OutputOptions]:
    """The core request (inputs decoded) and how to present its outputs; InvalidInputError naming the problem."""
    parameters = request.parameters
    priority = 0
    if parameters:
        for key in _SEQUENCE_PARAMETERS:
            choice = parameters[key].WhichOneof("parameter_choice") if key in parameters else None
            if choice is not None and getattr(parameters[key], choice):
                raise InvalidInputError(f"request parameter {key!r}: sequence batching is not supported")
        if "priority" in parameters:
            priority = _integer("request", "priority", parameters["priority"])
            if priority < 0:
                raise InvalidInputError(f"request parameter 'priority' must be >= 0, got {priority}")
    outputs, options = _output_options(request) if request.outputs or parameters else (None, OutputOptions())
    core = InferenceRequest(
        model=request.model_name,
        version=_version(request) if parameters else parse_version(request.model_version),
        inputs=decode_inputs(request),
        outputs=outputs,
        request_id=request_id,
        deadline=_deadline(parameters, call_deadline) if parameters else call_deadline,
        priority=priority,
    )
    return core, options


def encode_response(
    request_id: str,
    result: InferenceResult,
    options: OutputOptions,
    *,
    batched: bool,
    labels: Callable[[str], Sequence[str]] | None = None,
) -> pb.ModelInferResponse:
    """The response for `result`: every output, raw (one raw_output_contents entry each, in order) or typed.

    `labels(output)` gives the class labels of an output, for classification; `batched` says whether dim 0 is
    the batch dimension.
    """
    response = pb.ModelInferResponse(model_name=result.model, model_version=str(result.version), id=request_id)
    raw: list[bytes] = []
    for name, value in result.outputs.items():
        array: npt.NDArray[Any] = value
        count = options.classification.get(name)
        if count:
            array = classify(name, array, count, batched=batched, labels=labels(name) if labels else ())
        tensor = response.outputs.add(name=name, datatype=dtype_name(array.dtype), shape=array.shape)
        if options.typed:
            encode_typed(name, array, tensor.contents)
        else:
            raw.append(encode_raw(array))
    if raw:
        response.raw_output_contents.extend(raw)
    return response
