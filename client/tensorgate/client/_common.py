"""Everything `Client` and `AsyncClient` share that is not I/O: results, requests, parsing, channel settings.

Both clients are thin: each method builds its request here, makes one call, and parses the reply here, so the
two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy.typing as npt

from tensorgate.client._retry import RETRY_OPTIONS
from tensorgate.client.errors import (
    TensorgateClientError,
    error_for_code,
    from_rpc_error,
    status_code_from_number,
)
from tensorgate.client.frames import Frame, FrameTimings, Image, Preprocessing, build_config, build_frame
from tensorgate.client.tensors import TensorFormatError, from_tensor, from_wire_dtype, to_tensor
from tensorgate.v1 import models_pb2, predict_pb2, stream_pb2, tensor_pb2

if TYPE_CHECKING:  # imported on first use only: see build_load_request
    from tensorgate.oip import grpc_service_pb2 as oip_pb2

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "LOAD_BALANCING_POLICIES",
    "ChannelSettings",
    "FrameError",
    "FrameNumberer",
    "Inputs",
    "ModelInfo",
    "ModelMetadata",
    "RepositoryEntry",
    "StreamFrame",
    "StreamResult",
    "TensorInfo",
    "VersionInfo",
    "bearer_metadata",
    "build_load_request",
    "build_metadata_request",
    "build_predict_request",
    "build_ready_request",
    "build_repository_request",
    "build_stream_config",
    "build_unload_request",
    "channel_settings",
    "is_lost_stream_status",
    "load_balancing_config",
    "merge_service_config",
    "parse_metadata",
    "parse_models",
    "parse_outputs",
    "parse_repository",
    "parse_stream_response",
    "rpc_errors",
]

#: A model's inputs by name: arrays, or anything `numpy.asarray` turns into one.
Inputs = Mapping[str, npt.ArrayLike]

_MIB = 1024 * 1024
#: gRPC's own default receive limit is 4 MiB, which a single batch of images exceeds; the server's default
#: limit is larger too. Calls failing with UNAVAILABLE are retried (`_retry`; `options=NO_RETRIES` turns it off).
#: Any of these can be overridden through the clients' `options`.
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", 64 * _MIB),
    ("grpc.max_send_message_length", 64 * _MIB),
    *RETRY_OPTIONS,
)


# Results --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameError:
    """Why one frame of a stream failed; the stream itself goes on.

    Attributes:
        code: the gRPC status code name, e.g. "INVALID_ARGUMENT".
        message: the server's message.
    """

    code: str
    message: str

    def to_exception(self) -> TensorgateClientError:
        """The exception a unary call would have raised for this failure (not raised, returned)."""
        return error_for_code(grpc.StatusCode[self.code], self.message)


@dataclass(frozen=True)
class StreamResult:
    """The result of one frame of a stream: its outputs, or its error.

    Attributes:
        sequence: the frame's number, 0 for the first frame the client sent, then 1, 2, ...
        outputs: the output arrays by name; empty when the frame failed.
        error: set instead of `outputs` when the frame failed.
        version: the model version that served the frame.
        capture_time_ns: the frame's capture time (`time.time_ns()` units), as it was sent.
        received_time_ns: when this client received the result (`time.time_ns()`).
        dropped: frames the server dropped (per the stream's policy) since the previous result; they were sent
            before this one and get no result of their own.
        timings: where the frame's time on the server went.
    """

    sequence: int
    outputs: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    error: FrameError | None = None
    version: int = 0
    capture_time_ns: int = 0
    received_time_ns: int = 0
    dropped: int = 0
    timings: FrameTimings = field(default_factory=FrameTimings)

    @property
    def ok(self) -> bool:
        """Whether the frame succeeded."""
        return self.error is None

    @property
    def latency(self) -> float | None:
        """Seconds from the frame's capture to this result's arrival (both on this machine's clock, unless the
        frame's capture time came from elsewhere); None when either is unknown."""
        if not self.capture_time_ns or not self.received_time_ns:
            return None
        return (self.received_time_ns - self.capture_time_ns) / 1e9


@dataclass(frozen=True)
class VersionInfo:
    """One version of a model and its state: "LOADING", "READY", "UNLOADING" or "FAILED" (then `reason`)."""

    version: int
    state: str
    reason: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A model the server knows, its platform, its versions, and a problem with the model as a whole."""

    name: str
    platform: str
    versions: list[VersionInfo]
    reason: str = ""


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: its name, dtype name (e.g. "FP32") and shape (-1 for a variable dimension)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A model version's tensors and what serves it.

    Shapes include the batch dimension as -1 when the model batches (`max_batch_size` > 0); `engine` is what
    actually runs it, e.g. "onnxruntime (CPUExecutionProvider)".
    """

    name: str
    version: int
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    max_batch_size: int
    engine: str

    def input(self, name: str) -> TensorInfo:
        """The input called `name` (KeyError if the model has none)."""
        for info in self.inputs:
            if info.name == name:
                return info
        raise KeyError(name)


@dataclass(frozen=True)
class RepositoryEntry:
    """One entry of the server's repository index (the Open Inference Protocol's `RepositoryIndex`).

    Attributes:
        name: the model's name (its directory in the repository).
        version: the version; None for an entry of the model as a whole, which has no version loaded
            (unloaded, or none could be read: see `reason`).
        state: "READY", "LOADING", "UNLOADING" or "UNAVAILABLE" (failed or unloaded: see `reason`).
        reason: why the entry is not ready, e.g. "unloaded" or the load error; empty when there is nothing to say.
    """

    name: str
    version: int | None
    state: str
    reason: str = ""

    @property
    def ready(self) -> bool:
        """Whether this version takes requests."""
        return self.state == "READY"


# Channel --------------------------------------------------------------------------------------------------

Pem = bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class ChannelSettings:
    """What both clients need to open a channel: target, credentials (None: plaintext) and options."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    metadata: tuple[tuple[str, str | bytes], ...]


def _read_pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_settings(
    address: str,
    *,
    tls: bool,
    root_certificates: Pem | None,
    private_key: Pem | None,
    certificate_chain: Pem | None,
    options: Iterable[tuple[str, Any]],
    metadata: Iterable[tuple[str, str | bytes]],
    token: str | None = None,
    load_balancing: str | None = None,
) -> ChannelSettings:
    """Resolve the clients' constructor arguments. Any certificate turns TLS on; later options win; a token
    becomes `authorization: Bearer <token>` metadata on every call."""
    if not address:
        raise ValueError("address is empty; expected HOST:PORT")
    fixed = tuple(metadata)
    if token is not None:
        if any(key.lower() == "authorization" for key, _ in fixed):
            raise ValueError("give the token once: as token=, or as authorization metadata, not both")
        fixed += (bearer_metadata(token),)
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(options)
    if load_balancing is not None:
        merge_service_config(merged, load_balancing_config(load_balancing))
    credentials = None
    if tls or root_certificates is not None or private_key is not None or certificate_chain is not None:
        if (private_key is None) != (certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_pem(root_certificates),
            private_key=_read_pem(private_key),
            certificate_chain=_read_pem(certificate_chain),
        )
    return ChannelSettings(address, credentials, list(merged.items()), fixed)


def bearer_metadata(token: str) -> tuple[str, str]:
    """The `authorization` metadata entry for a bearer token (surrounding blanks, like a file's newline, are
    dropped); ValueError for a token that cannot travel as one metadata value (empty, spaces, non-ASCII)."""
    token = token.strip()
    if not token or not all("!" <= char <= "~" for char in token):
        raise ValueError("the token must be non-empty printable ASCII without spaces")
    return ("authorization", f"Bearer {token}")


#: gRPC's built-in client-side load-balancing policies: `round_robin` spreads calls over every address the target
#: resolves to (`dns:///tensorgate-headless:8001`: one connection per pod); `pick_first`, gRPC's default, uses one.
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")


def load_balancing_config(policy: str) -> dict[str, Any]:
    """The service config that picks the channel's load-balancing policy (see `LOAD_BALANCING_POLICIES`)."""
    if policy not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}; got {policy!r}")
    return {"loadBalancingConfig": [{policy: {}}]}


def merge_service_config(options: dict[str, Any], config: Mapping[str, Any]) -> None:
    """Merge `config` into the channel's `grpc.service_config` option (JSON), keeping the keys already there
    (a caller's or a retry policy's `methodConfig`): gRPC takes only one service config per channel."""
    current = options.get("grpc.service_config") or "{}"
    merged = json.loads(current) if isinstance(current, str) else dict(current)
    merged.update(config)
    options["grpc.service_config"] = json.dumps(merged)


def resolve_timeout(timeout: float | None, default: float | None) -> float | None:
    """A call's timeout: its own, else the client's default (None: no deadline)."""
    return default if timeout is None else timeout


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise a `grpc.RpcError` from the block as its `TensorgateClientError` subclass."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


def is_lost_stream_status(error: BaseException | None) -> bool:
    """Whether grpc.aio replaced the status a server ended a stream with by its own INTERNAL error.

    When the server ends a bidirectional call while a client write is in flight, grpc.aio's failed write
    overwrites the server's status with INTERNAL "Internal error from Core" (grpc/grpc#36066, open in grpcio
    1.85). The sync API is not affected.
    """
    return (
        isinstance(error, grpc.aio.AioRpcError)
        and error.code() is grpc.StatusCode.INTERNAL
        and error.details() == "Internal error from Core"
        and "SendMessageOperation" in (error.debug_error_string() or "")
    )


# Requests -------------------------------------------------------------------------------------------------


def _wire_version(version: int | None) -> int:
    if version is None:
        return 0
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, or None for the server's choice; got {version!r}")
    return version


def _output_names(outputs: Iterable[str] | None) -> list[str]:
    if outputs is None:
        return []
    if isinstance(outputs, str):
        raise TypeError(f"outputs must be a list of names, not the string {outputs!r}")
    return list(outputs)


def _encode_inputs(inputs: Inputs) -> list[tensor_pb2.Tensor]:
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a mapping of name to array, not {type(inputs).__name__}")
    return [to_tensor(name, value) for name, value in inputs.items()]


def build_predict_request(
    model: str,
    inputs: Inputs,
    *,
    version: int | None = None,
    outputs: Iterable[str] | None = None,
    priority: int = 0,
    request_id: str = "",
) -> predict_pb2.PredictRequest:
    """The `PredictRequest` for `predict`; ValueError/TypeError for arguments no server could accept."""
    if priority < 0:
        raise ValueError(f"priority must be >= 0 (1 is the highest, 0 the model's default); got {priority}")
    return predict_pb2.PredictRequest(
        model=model,
        version=_wire_version(version),
        inputs=_encode_inputs(inputs),
        outputs=_output_names(outputs),
        priority=priority,
        request_id=request_id,
    )


def build_stream_config(
    model: str,
    *,
    version: int | None = None,
    outputs: Iterable[str] | None = None,
    policy: str | None = None,
    queue_size: int = 0,
    max_in_flight: int = 0,
    preprocessing: Preprocessing | None = None,
) -> stream_pb2.StreamRequest:
    """The first message of a stream: its configuration."""
    config = build_config(
        model,
        version=_wire_version(version),
        outputs=_output_names(outputs),
        policy=policy,
        queue_size=queue_size,
        max_in_flight=max_in_flight,
        preprocessing=preprocessing,
    )
    return stream_pb2.StreamRequest(config=config)


#: What a stream's frames may be: input arrays by name, an image, or a `Frame` (with its capture time).
StreamFrame = Inputs | Image | Frame


class FrameNumberer:
    """Turns a stream's frames into `StreamRequest`s numbered 0, 1, 2, ...

    A stream's requests are read by gRPC (on its own thread, or its own task), where an exception would only
    cancel the call. The client's request generators store it in `error` instead and stop sending; the client
    raises it to the caller after the results of the frames already sent.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.error: BaseException | None = None

    def request(self, frame: StreamFrame) -> stream_pb2.StreamRequest:
        """The next frame's request."""
        message = build_frame(frame, self.sent)
        self.sent += 1
        return stream_pb2.StreamRequest(frame=message)


def build_metadata_request(model: str, *, version: int | None = None) -> models_pb2.ModelMetadataRequest:
    """The `ModelMetadataRequest` for `metadata`."""
    return models_pb2.ModelMetadataRequest(model=model, version=_wire_version(version))


def build_ready_request(model: str, *, version: int | None = None) -> models_pb2.ModelReadyRequest:
    """The `ModelReadyRequest` for `ready`."""
    return models_pb2.ModelReadyRequest(model=model, version=_wire_version(version))


def _model_name(model: str) -> str:
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a model's name (its directory in the repository); got {model!r}")
    return model


# The Open Inference Protocol's modules are imported on first use, here and in the clients: importing them
# registers the protobuf package `inference`, as tritonclient's own stubs do, and the two cannot share a process
# (FACTS.md). So `import tensorgate.client` beside tritonclient keeps working; only the repository calls need them.


def build_load_request(model: str) -> oip_pb2.RepositoryModelLoadRequest:
    """The `RepositoryModelLoadRequest` for `load` (one repository per server: no repository name)."""
    from tensorgate.oip import grpc_service_pb2 as messages

    return messages.RepositoryModelLoadRequest(model_name=_model_name(model))


def build_unload_request(model: str) -> oip_pb2.RepositoryModelUnloadRequest:
    """The `RepositoryModelUnloadRequest` for `unload`."""
    from tensorgate.oip import grpc_service_pb2 as messages

    return messages.RepositoryModelUnloadRequest(model_name=_model_name(model))


def build_repository_request(*, ready: bool = False) -> oip_pb2.RepositoryIndexRequest:
    """The `RepositoryIndexRequest` for `repository`: every entry, or with `ready` the ready ones only."""
    from tensorgate.oip import grpc_service_pb2 as messages

    return messages.RepositoryIndexRequest(ready=ready)


# Responses ------------------------------------------------------------------------------------------------


def parse_outputs(tensors: Iterable[tensor_pb2.Tensor]) -> dict[str, npt.NDArray[Any]]:
    """Decode output tensors by name (read-only arrays over the received bytes, no copy)."""
    return {tensor.name: from_tensor(tensor) for tensor in tensors}


def parse_stream_response(response: stream_pb2.StreamResponse) -> StreamResult:
    """A `StreamResponse` as a `StreamResult`, stamped with the time it is parsed (as received)."""
    received = time.time_ns()
    error = None
    if response.HasField("error"):
        code = status_code_from_number(response.error.code)
        error = FrameError(code.name, response.error.message)
    return StreamResult(
        sequence=response.sequence,
        outputs={} if error is not None else parse_outputs(response.outputs),
        error=error,
        version=response.version,
        capture_time_ns=response.capture_time_ns,
        received_time_ns=received,
        dropped=response.dropped,
        timings=FrameTimings.from_message(response.timings),
    )


def _index_version(text: str) -> int | None:
    # The protocol carries versions as strings; tensorgate's (and Triton's) are numbers, "" for a whole model.
    return int(text) if text.isdigit() else None


def parse_repository(response: oip_pb2.RepositoryIndexResponse, *, model: str | None = None) -> list[RepositoryEntry]:
    """A `RepositoryIndexResponse` as `RepositoryEntry`s in the server's order; only `model`'s when given."""
    return [
        RepositoryEntry(entry.name, _index_version(entry.version), entry.state, entry.reason)
        for entry in response.models
        if model is None or entry.name == model
    ]


def _version_state(value: int) -> str:
    try:
        return models_pb2.VersionState.Name(value).removeprefix("VERSION_STATE_")  # type: ignore[arg-type]
    except ValueError:  # a state added to the contract after this client was built
        return f"STATE_{value}"


def parse_models(response: models_pb2.ListModelsResponse) -> list[ModelInfo]:
    """A `ListModelsResponse` as `ModelInfo`s, in the server's order."""
    return [
        ModelInfo(
            name=model.name,
            platform=model.platform,
            versions=[VersionInfo(v.version, _version_state(v.state), v.reason) for v in model.versions],
            reason=model.reason,
        )
        for model in response.models
    ]


def _dtype_name(value: int) -> str:
    try:
        return from_wire_dtype(value)
    except TensorFormatError:  # unset, or added to the contract after this client was built: show, don't fail
        return "UNSPECIFIED" if value == 0 else f"DTYPE_{value}"


def _tensor_infos(specs: Iterable[tensor_pb2.TensorSpec]) -> list[TensorInfo]:
    return [TensorInfo(spec.name, _dtype_name(spec.dtype), tuple(spec.shape)) for spec in specs]


def parse_metadata(response: models_pb2.ModelMetadataResponse) -> ModelMetadata:
    """A `ModelMetadataResponse` as `ModelMetadata`."""
    return ModelMetadata(
        name=response.name,
        version=response.version,
        platform=response.platform,
        inputs=_tensor_infos(response.inputs),
        outputs=_tensor_infos(response.outputs),
        max_batch_size=response.max_batch_size,
        engine=response.engine,
    )
