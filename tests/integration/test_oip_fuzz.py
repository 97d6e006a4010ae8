"""Fuzzing the Open Inference Protocol's ModelInfer and ModelStreamInfer on the real server (as test_fuzz.py
does for tensorgate's own API): whatever a client sends, every call gets a proper status, and the server goes on.

- raw bytes as the ModelInfer body (undecodable bodies, and valid requests with bytes flipped, cut or added);
- well-formed requests with random field values: model names, version strings, inputs with random datatype
  strings, shapes and raw or typed contents (and both), raw_input_contents counts, requested outputs with
  parameters, request parameters (priority, timeout, sequence, binary_data_output);
- streams of such requests: each must get exactly one response, in order, on a stream that stays open.

The oracle: every status is in an allowed set (never INTERNAL or UNKNOWN, a server bug), an OK answer carries
the right values (add_sub: sum == a + b exactly), a failed stream request carries an error_message that is not
an internal error, and a good request succeeds after each example.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.support.serving import ServerThread

Stub = pb_grpc.GRPCInferenceServiceStub

INPUTS: dict[str, dict[str, tuple[int, ...]]] = {"digits": {"image": (1, 8, 8)}, "add_sub": {"a": (4,), "b": (4,)}}
OUTPUTS: dict[str, tuple[str, ...]] = {"digits": ("probabilities", "label"), "add_sub": ("sum", "difference")}
MAX_ROWS = 64

ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a fuzzed `timeout` parameter of a few microseconds
    }
)
CALL_TIMEOUT = 60.0

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
DATATYPES += ["FP16", "BF16", "FP32", "FP64", "BYTES"]
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4}
ITEMSIZE |= {"INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8}
TYPED_FIELDS = [
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

USUALLY = st.sampled_from([True] * 7 + [False])


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
    return draw(usual if draw(USUALLY) else anything)


MODEL_NAMES = st.one_of(st.sampled_from(["digits", "add_sub", "", "DIGITS", "none", "add_sub "]), st.text(max_size=20))
VERSIONS = st.one_of(
    st.sampled_from(["", "", "1", "2", "0", "-1", "01", "1.0", "latest", str(2**63), str(2**70)]), st.text(max_size=8)
)
TENSOR_NAMES = st.one_of(st.sampled_from(["image", "a", "b", "sum", "", "A"]), st.text(max_size=12))
DATATYPE_NAMES = st.one_of(st.sampled_from(DATATYPES), st.sampled_from(["", "fp32", "FLOAT", "STRING"]), st.text())
DIMS = st.one_of(
    st.integers(0, 9),
    st.sampled_from([-1, 64, 65, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def typed_contents(draw: st.DrawFn, count: int) -> pb.InferTensorContents:
    """Typed contents: usually the right count in one field, sometimes anything in any fields."""
    contents = pb.InferTensorContents()
    size = count if 0 <= count <= 512 and draw(USUALLY) else draw(st.integers(0, 20))
    for field in draw(st.lists(st.sampled_from(TYPED_FIELDS), min_size=1, max_size=2)):
        values: list[Any]
        if field == "bool_contents":
            values = draw(st.lists(st.booleans(), min_size=size, max_size=size))
        elif field == "bytes_contents":
            values = draw(st.lists(st.binary(max_size=6), min_size=size, max_size=size))
        elif field in ("fp32_contents", "fp64_contents"):
            values = draw(st.lists(st.floats(width=32), min_size=size, max_size=size))
        elif field == "int_contents":
            values = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=size, max_size=size))
        elif field == "uint_contents":
            values = draw(st.lists(st.integers(0, 2**32 - 1), min_size=size, max_size=size))
        elif field == "int64_contents":
            values = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=size, max_size=size))
        else:
            values = draw(st.lists(st.integers(0, 2**64 - 1), min_size=size, max_size=size))
        getattr(contents, field).extend(values)
    return contents


@st.composite
def random_tensor(draw: st.DrawFn) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """Any input header with raw bytes (sometimes of the size its shape needs) and sometimes typed contents."""
    datatype = draw(DATATYPE_NAMES)
    shape = draw(st.lists(DIMS, max_size=5))
    count = math.prod(shape) if all(dim >= 0 for dim in shape) else -1
    raws = [st.binary(max_size=64)]
    if datatype in ITEMSIZE and 0 <= count * ITEMSIZE[datatype] <= 4096:
        raws.append(st.binary(min_size=count * ITEMSIZE[datatype], max_size=count * ITEMSIZE[datatype]))
    if datatype == "BYTES" and 0 <= count <= 16:
        elements = st.lists(st.binary(max_size=8), min_size=count, max_size=count)
        raws.append(elements.map(lambda items: b"".join(len(i).to_bytes(4, "little") + i for i in items)))
    tensor = pb.ModelInferRequest.InferInputTensor(name=draw(TENSOR_NAMES), datatype=datatype, shape=shape)
    if draw(st.sampled_from([False, False, True])):
        tensor.contents.CopyFrom(draw(typed_contents(count)))
    return tensor, draw(st.one_of(raws))


@st.composite
def valid_inputs(draw: st.DrawFn, model: str) -> tuple[list[pb.ModelInferRequest.InferInputTensor], list[bytes]]:
    """A correct input set for `model`, raw or typed: 1..MAX_ROWS rows of finite FP32 values."""
    rows = draw(st.one_of(st.integers(1, 4), st.integers(1, MAX_ROWS)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    typed = draw(st.sampled_from([False, False, True]))
    tensors, raws = [], []
    for name, shape in INPUTS[model].items():
        array = rng.uniform(-16, 16, (rows, *shape)).astype(np.float32)
        tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=array.shape)
        if typed:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
        else:
            raws.append(array.tobytes())
        tensors.append(tensor)
    return tensors, raws


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """Well-formed requests whose fields are mostly right, so that a fair share is served (and checked)."""
    model = _mostly(draw, st.sampled_from(sorted(INPUTS)), MODEL_NAMES)
    request = pb.ModelInferRequest(
        model_name=model,
        model_version=_mostly(draw, st.sampled_from(["", "1"]), VERSIONS),
        id=draw(st.one_of(st.just(""), st.text(max_size=20))),
    )
    if model in INPUTS and draw(USUALLY):
        tensors, raws = draw(valid_inputs(model))
        mutation = draw(st.sampled_from(["none"] * 4 + ["field", "drop", "duplicate", "extra", "raw", "mix"]))
        if mutation == "field":
            index = draw(st.integers(0, len(tensors) - 1))
            noise, _ = draw(random_tensor())
            field = draw(st.sampled_from(["name", "datatype", "shape"]))
            if field == "shape":
                tensors[index].shape[:] = noise.shape
            else:
                setattr(tensors[index], field, getattr(noise, field))
        elif mutation == "drop":
            del tensors[-1]
            if raws:
                del raws[-1]
        elif mutation == "duplicate":
            tensors.append(tensors[0])
            if raws:
                raws.append(raws[0])
        elif mutation == "extra":
            noise, noise_raw = draw(random_tensor())
            tensors.append(noise)
            if raws:
                raws.append(noise_raw)
        elif mutation == "raw" and raws:  # one blob too many or too few
            raws = raws[1:] if draw(st.booleans()) else [*raws, b"\0" * 4]
        elif mutation == "mix":  # raw blobs plus typed contents on one input
            if raws:
                tensors[0].contents.fp32_contents.append(1.0)
            else:
                raws = [b"\0" * 4]
    else:
        pairs = draw(st.lists(random_tensor(), max_size=3))
        tensors = [tensor for tensor, _ in pairs]
        raws = [raw for _, raw in pairs] if draw(st.booleans()) else []
    request.inputs.extend(tensors)
    request.raw_input_contents.extend(raws)
    known = OUTPUTS.get(model, ("sum",))
    names = _mostly(
        draw, st.lists(st.sampled_from(known), max_size=2), st.lists(st.sampled_from([*known, "nope", ""]), max_size=3)
    )
    for name in names:
        output = request.outputs.add(name=name)
        if draw(st.sampled_from([False, False, True])):
            output.parameters["classification"].int64_param = draw(st.sampled_from([0, 1, 3, 20, -1]))
        if draw(st.sampled_from([False, False, True])):
            output.parameters["binary_data"].bool_param = draw(st.booleans())
    if draw(USUALLY):  # parameters tensorgate reads, with sensible values
        if draw(st.booleans()):
            request.parameters["priority"].uint64_param = draw(st.sampled_from([0, 1]))
        if draw(st.booleans()):
            request.parameters["timeout"].int64_param = draw(st.sampled_from([0, 30_000_000]))
        return request
    for key in draw(st.lists(st.sampled_from(["priority", "timeout", "sequence_id", "binary_data_output", "x"]))):
        parameter = request.parameters[key]
        choice = draw(st.sampled_from(["int64", "uint64", "bool", "string", "double"]))
        if choice == "int64":
            parameter.int64_param = draw(st.sampled_from([0, 1, 2, -1, 10**6, 2**63 - 1]))
        elif choice == "uint64":
            parameter.uint64_param = draw(st.sampled_from([0, 1, 2, 2**64 - 1]))
        elif choice == "bool":
            parameter.bool_param = draw(st.booleans())
        elif choice == "string":
            parameter.string_param = draw(st.text(max_size=5))
        else:
            parameter.double_param = draw(st.floats())
    return request


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Random bytes, or a serialized request with bits flipped or bytes changed, cut or added."""
    if not draw(USUALLY):
        return draw(st.binary(max_size=300))
    body = bytearray(draw(infer_requests()).SerializeToString())
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        where = draw(st.integers(0, len(body)))
        operation = draw(st.sampled_from(["bit", "byte", "cut", "insert"]))
        if operation == "bit" and where < len(body):
            body[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "byte" and where < len(body):
            body[where] = draw(st.integers(0, 255))
        elif operation == "cut":
            del body[where:]
        else:
            body[where:where] = draw(st.binary(min_size=1, max_size=12))
    return bytes(body)


# -- the oracle ---------------------------------------------------------------------------------------------


def _decode(tensor: Any, raw: bytes | None) -> np.ndarray[Any, Any]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    if raw is not None:
        return np.frombuffer(raw, dtypes[tensor.datatype]).reshape(tensor.shape)
    values = tensor.contents.fp32_contents if tensor.datatype == "FP32" else tensor.contents.int64_contents
    return np.array(values, dtypes[tensor.datatype]).reshape(tensor.shape)


def given_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray[Any, Any]]:
    raws: Sequence[bytes | None] = list(request.raw_input_contents) or [None] * len(request.inputs)
    return {t.name: _decode(t, raw) for t, raw in zip(request.inputs, raws, strict=True)}


def check_response(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    """An OK answer: the outputs asked for (all when none), with the values the model must compute."""
    model = request.model_name
    assert model in INPUTS, f"OK for a model that is not served: {model!r}"
    assert (response.model_name, response.model_version, response.id) == (model, "1", request.id)
    inputs = given_inputs(request)
    assert set(inputs) == set(INPUTS[model])
    requested = [o.name for o in request.outputs]
    names = [t.name for t in response.outputs]
    assert names == (requested or list(OUTPUTS[model]))
    classified = {o.name for o in request.outputs if o.parameters["classification"].int64_param > 0}
    raws: Sequence[bytes | None] = list(response.raw_output_contents) or [None] * len(names)
    assert len(raws) == len(names)
    rows = next(iter(inputs.values())).shape[0]
    for tensor, raw in zip(response.outputs, raws, strict=True):
        if tensor.name in classified:
            assert tensor.datatype == "BYTES"
            assert tensor.shape[0] == rows
            continue
        array = _decode(tensor, raw)
        if model == "add_sub":
            a, b = inputs["a"], inputs["b"]
            expected = a + b if tensor.name == "sum" else a - b
            np.testing.assert_allclose(array, expected, rtol=0, atol=2e-38, equal_nan=True)
        elif tensor.name == "probabilities":
            assert array.shape == (rows, 10)
            np.testing.assert_allclose(array.sum(axis=1), 1.0, atol=1e-3)
        else:
            assert array.shape == (rows,)
            assert np.all((array >= 0) & (array <= 9))


def check_call(request: pb.ModelInferRequest, code: grpc.StatusCode, details: str, response: Any) -> None:
    event(code.name)
    assert code in ALLOWED, f"{code.name}: {details}"
    if code is grpc.StatusCode.OK:
        check_response(request, response)
    else:
        assert details, f"{code.name} without a message"


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, error)
    return call.code(), call.details() or ""


def good_request(model: str, rows: int = 3) -> pb.ModelInferRequest:
    rng = np.random.default_rng(rows)
    request = pb.ModelInferRequest(model_name=model, id="good")
    for name, shape in INPUTS[model].items():
        array = rng.uniform(0, 16, (rows, *shape)).astype(np.float32)
        request.inputs.add(name=name, datatype="FP32", shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


def assert_still_serving(stub: Stub) -> None:
    for model in INPUTS:
        request = good_request(model)
        check_response(request, stub.ModelInfer(request, timeout=CALL_TIMEOUT))


@pytest.fixture(scope="module")
def oip_channel(served: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(oip_channel: grpc.Channel) -> Stub:
    return Stub(oip_channel)


# -- the tests ----------------------------------------------------------------------------------------------


def test_random_bytes_as_the_body_always_get_a_status(oip_channel: grpc.Channel, stub: Stub) -> None:
    raw_infer: grpc.UnaryUnaryMultiCallable[bytes, bytes] = oip_channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
    )

    @FUZZ
    @given(bodies())
    def check(body: bytes) -> None:
        try:
            parsed: pb.ModelInferRequest | None = pb.ModelInferRequest.FromString(body)
        except DecodeError:
            parsed = None
        try:
            reply = raw_infer(body, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            code, details = _status(error)
            if parsed is None:
                assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
                assert "cannot be parsed" in details
            else:
                check_call(parsed, code, details, None)
            return
        assert parsed is not None, "OK for a body that does not parse"
        check_call(parsed, grpc.StatusCode.OK, "", pb.ModelInferResponse.FromString(reply))

    check()
    assert_still_serving(stub)


def test_random_field_values_get_proper_statuses(stub: Stub) -> None:
    @FUZZ
    @given(infer_requests())
    def check(request: pb.ModelInferRequest) -> None:
        try:
            response = stub.ModelInfer(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            check_call(request, *_status(error), None)
        else:
            check_call(request, grpc.StatusCode.OK, "", response)
        assert_still_serving(stub)

    check()


def test_random_stream_requests_each_get_one_response_in_order(stub: Stub) -> None:
    @settings(FUZZ, max_examples=60)
    @given(st.lists(infer_requests(), min_size=1, max_size=8))
    def check(requests: list[pb.ModelInferRequest]) -> None:
        last = good_request("add_sub", rows=2)
        sent = [*requests, last]
        responses = list(stub.ModelStreamInfer(iter(sent), timeout=CALL_TIMEOUT))
        assert len(responses) == len(sent), "every request gets exactly one response"
        for request, response in zip(sent, responses, strict=True):
            assert response.infer_response.id == request.id, "responses out of order"
            event("request error" if response.error_message else "request OK")
            if response.error_message:
                assert not response.error_message.startswith("internal error"), response.error_message
                assert not response.infer_response.outputs
            else:
                check_response(request, response.infer_response)
        assert not responses[-1].error_message, responses[-1].error_message

    check()
