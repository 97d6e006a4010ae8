"""Fuzzing the real server: whatever a client sends, every call gets a proper status, and the server goes on.

Hypothesis generates requests against the session's server (examples/models: digits and add_sub):

- raw bytes as the message body, sent with identity serializers (undecodable bodies, and valid requests with
  bytes flipped, cut or added);
- well-formed messages with random field values: model names, versions (negative, huge), tensors with random
  names, dtype enum values (out of range too), shapes (negative, 2**40, 2**62, int64 extremes), raw lengths;
- the same on the Stream service: a config, then random frames (and stray configs), each of which must get
  its own result, in order, on a stream that stays open.

The oracle: every status is in an allowed set (never INTERNAL or UNKNOWN, which mean a server bug), an OK
answer carries the right values (add_sub: sum == a + b exactly), and a good request succeeds after each
example. Each RPC has a generous deadline, so a hang fails the test as DEADLINE_EXCEEDED instead of stalling.

A body that does not parse as the request message is answered INVALID_ARGUMENT: the server's error
interceptor swaps a failed parse for a placeholder that the handler wrapper refuses (left to grpc.aio, it
would be UNKNOWN with a logged traceback per call, and a DecodeError inside a stream handler).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any, cast

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc, tensor_pb2
from tests.support.serving import ServerThread

# -- the models and the rules -------------------------------------------------------------------------------

#: Each served model's inputs (name -> non-batch shape, all FP32) and outputs.
INPUTS: dict[str, dict[str, tuple[int, ...]]] = {"digits": {"image": (1, 8, 8)}, "add_sub": {"a": (4,), "b": (4,)}}
OUTPUTS: dict[str, tuple[str, ...]] = {"digits": ("probabilities", "label"), "add_sub": ("sum", "difference")}
MAX_ROWS = 64  # both models' max_batch_size

#: What a call may end with, whatever it sent. INTERNAL and UNKNOWN mean a server bug; DEADLINE_EXCEEDED a hang.
ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
    }
)
#: The same as FrameError code numbers (a frame's result never says OK in `error`).
ALLOWED_FRAME_CODES = frozenset(code.value[0] for code in ALLOWED - {grpc.StatusCode.OK})
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]

#: Per-RPC deadline: far beyond any honest call on a loaded machine, so only a hang reaches it.
CALL_TIMEOUT = 60.0

FP32 = tensor_pb2.DATA_TYPE_FP32
BYTES = tensor_pb2.DATA_TYPE_BYTES
#: Bytes per element by dtype enum value (BOOL is one byte; BYTES has no fixed size).
ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 2, 8: 4, 9: 8, 10: 2, 11: 2, 12: 4, 13: 8}

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the shared tree; hypothesis prints the falsifying example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- strategies ---------------------------------------------------------------------------------------------

#: Drawn to decide whether a field gets a usual value (True, seven times in eight) or any value at all.
#: (A one_of of the two strategies would not do: hypothesis switches one_of branches on and off per example.)
USUALLY = st.sampled_from([True] * 7 + [False])


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> Any:
    """A draw from `usual` most of the time, else from `anything`: so that most requests pass most checks."""
    return draw(usual if draw(USUALLY) else anything)


MODEL_NAMES = st.one_of(
    st.sampled_from(["digits", "add_sub", "digits", "add_sub", "", "DIGITS", "digits ", "add_sub/1", "none"]),
    st.text(max_size=30),
)
VERSIONS = st.one_of(
    st.sampled_from([0, 0, 0, 1, 1, 2, -1, 2**31, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
TENSOR_NAMES = st.one_of(st.sampled_from(["image", "a", "b", "sum", "label", "", "A", "image\0"]), st.text(max_size=20))
OUTPUT_NAMES = st.one_of(st.sampled_from(["probabilities", "label", "sum", "difference", "image", ""]), st.text())
DTYPES = st.one_of(
    st.integers(0, 15), st.sampled_from([-1, 16, 99, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)
DIMS = st.one_of(
    st.integers(0, 9),
    st.sampled_from([-1, 64, 65, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)


@st.composite
def random_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """Any tensor: random name, dtype value, shape and raw, sometimes with the raw length the shape needs."""
    dtype = draw(DTYPES)
    shape = draw(st.lists(DIMS, max_size=6))
    if shape and draw(st.sampled_from([False, False, True])):  # zero elements, whatever the other dims say
        shape.insert(draw(st.integers(0, len(shape))), 0)
    count = math.prod(shape) if all(dim >= 0 for dim in shape) else -1
    raws = [st.binary(max_size=64)]
    if dtype in ITEMSIZE and 0 <= count * ITEMSIZE[dtype] <= 4096:
        size = count * ITEMSIZE[dtype]
        raws.append(st.binary(min_size=size, max_size=size))
    if dtype == BYTES and 0 <= count <= 16:
        elements = st.lists(st.binary(max_size=8), min_size=count, max_size=count)
        raws.append(elements.map(lambda items: b"".join(len(i).to_bytes(4, "little") + i for i in items)))
    raw = draw(st.one_of(raws))
    return tensor_pb2.Tensor(name=draw(TENSOR_NAMES), dtype=tensor_pb2.DataType.ValueType(dtype), shape=shape, raw=raw)


@st.composite
def valid_inputs(draw: st.DrawFn, model: str) -> list[tensor_pb2.Tensor]:
    """A correct input set for `model`: 1..MAX_ROWS rows of finite values the oracle can check."""
    rows = draw(st.one_of(st.integers(1, 4), st.integers(1, MAX_ROWS)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return [
        to_tensor(name, rng.uniform(-16, 16, (rows, *shape)).astype(np.float32))
        for name, shape in INPUTS[model].items()
    ]


@st.composite
def input_sets(draw: st.DrawFn, model: str) -> list[tensor_pb2.Tensor]:
    """Inputs for `model`: correct, correct with one thing broken, or (a third of the time) random tensors."""
    if model not in INPUTS or draw(st.sampled_from([False, False, True])):
        return draw(st.lists(random_tensors(), max_size=4))
    tensors = draw(valid_inputs(model))
    mutation = draw(st.sampled_from(["none"] * 4 + ["field", "drop", "duplicate", "extra", "rows"]))
    if mutation == "field":
        index = draw(st.integers(0, len(tensors) - 1))
        broken, noise = tensors[index], draw(random_tensors())
        field = draw(st.sampled_from(["name", "dtype", "shape", "raw"]))
        if field == "shape":
            broken.shape[:] = noise.shape
        else:
            setattr(broken, field, getattr(noise, field))
    elif mutation == "drop":
        del tensors[draw(st.integers(0, len(tensors) - 1))]
    elif mutation == "duplicate":
        tensors.append(tensors[draw(st.integers(0, len(tensors) - 1))])
    elif mutation == "extra":
        tensors.insert(draw(st.integers(0, len(tensors))), draw(random_tensors()))
    elif mutation == "rows":  # every input with 0 or more than MAX_ROWS rows, otherwise consistent
        rows = draw(st.sampled_from([0, MAX_ROWS + 1, 2 * MAX_ROWS]))
        tensors = [to_tensor(name, np.zeros((rows, *shape), np.float32)) for name, shape in INPUTS[model].items()]
    return tensors


@st.composite
def predict_requests(draw: st.DrawFn) -> predict_pb2.PredictRequest:
    """Well-formed PredictRequests with random field values; each field is mostly right, so that a fair share
    of requests is served (and checked) and the rest fail on one or two things, at every check in turn."""
    model = _mostly(draw, st.sampled_from(sorted(INPUTS)), MODEL_NAMES)
    outputs = _mostly(
        draw,
        st.one_of(st.just([]), st.lists(st.sampled_from(OUTPUTS.get(model, ("label",))), max_size=3)),
        st.lists(OUTPUT_NAMES, max_size=3),
    )
    return predict_pb2.PredictRequest(
        model=model,
        version=_mostly(draw, st.sampled_from([0, 1]), VERSIONS),
        inputs=draw(input_sets(model)),
        outputs=outputs,
        priority=_mostly(draw, st.sampled_from([0, 1]), st.integers(0, 2**32 - 1)),
        request_id=draw(st.one_of(st.just(""), st.text(max_size=40))),
    )


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Message bodies: random bytes, or a serialized request with bits flipped or bytes changed, cut or added."""
    if not draw(USUALLY):
        return draw(st.binary(max_size=300))
    body = bytearray(draw(predict_requests()).SerializeToString())
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        where = draw(st.integers(0, len(body)))
        operation = draw(st.sampled_from(["bit", "byte", "cut", "insert", "append"]))
        if operation == "bit" and where < len(body):
            body[where] ^= 1 << draw(st.integers(0, 7))
        elif operation == "byte" and where < len(body):
            body[where] = draw(st.integers(0, 255))
        elif operation == "cut":
            del body[where:]
        elif operation == "insert":
            body[where:where] = draw(st.binary(min_size=1, max_size=12))
        else:
            body += draw(st.binary(min_size=1, max_size=12))
    return bytes(body)


@st.composite
def stream_scripts(draw: st.DrawFn) -> tuple[stream_pb2.StreamConfig, list[stream_pb2.StreamRequest]]:
    """A config for a served model, then random frames, stray configs and empty messages."""
    model = draw(st.sampled_from(sorted(INPUTS)))
    config = stream_pb2.StreamConfig(
        model=model,
        version=draw(st.sampled_from([0, 1])),
        drop_policy=stream_pb2.DROP_POLICY_BLOCK,  # the oracle wants a result for every message
        outputs=_mostly(
            draw,
            st.one_of(st.just([]), st.lists(st.sampled_from(OUTPUTS[model]), max_size=2)),
            st.lists(OUTPUT_NAMES, max_size=2),
        ),
    )
    messages: list[stream_pb2.StreamRequest] = []
    for kind in draw(st.lists(st.sampled_from(["frame"] * 8 + ["config", "empty"]), min_size=1, max_size=12)):
        if kind == "frame":
            frame = stream_pb2.Frame(sequence=draw(st.integers(0, 2**64 - 1)), inputs=draw(input_sets(model)))
            messages.append(stream_pb2.StreamRequest(frame=frame))
        elif kind == "config":
            messages.append(stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model=draw(MODEL_NAMES))))
        else:
            messages.append(stream_pb2.StreamRequest())
    return config, messages


# -- the oracle ---------------------------------------------------------------------------------------------


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    call = cast(grpc.Call, error)
    return call.code(), call.details() or ""


def check_outputs(
    model: str, inputs: Sequence[tensor_pb2.Tensor], requested: Sequence[str], outputs: Sequence[tensor_pb2.Tensor]
) -> None:
    """An OK answer: the outputs asked for (all when none), with the values the model must compute."""
    assert model in INPUTS, f"OK for a model that is not served: {model!r}"
    given_inputs = {tensor.name: from_tensor(tensor) for tensor in inputs}
    assert set(given_inputs) == set(INPUTS[model]), f"OK for inputs {sorted(given_inputs)} of {model}"
    got = {tensor.name: from_tensor(tensor) for tensor in outputs}
    assert len(got) == len(outputs), f"an output came twice: {[t.name for t in outputs]}"
    assert set(got) == (set(requested) or set(OUTPUTS[model]))
    rows = next(iter(given_inputs.values())).shape[0]
    assert 1 <= rows <= MAX_ROWS
    if model == "add_sub":
        a, b = given_inputs["a"], given_inputs["b"]
        expected = {"sum": a + b, "difference": a - b}
        for name, array in got.items():
            assert array.dtype == np.float32
            # ONNX Runtime's Add/Sub on FP32 are IEEE float32 adds, as numpy's: exact, NaNs in the same places.
            # (Should ORT ever flush denormals, only random raw bytes could tell; the tolerance covers that.)
            np.testing.assert_allclose(array, expected[name], rtol=0, atol=2e-38, equal_nan=True)
        return
    image = given_inputs["image"]
    if "probabilities" in got:
        probabilities = got["probabilities"]
        assert probabilities.dtype == np.float32
        assert probabilities.shape == (rows, 10)
    if "label" in got:
        labels = got["label"]
        assert labels.dtype == np.int64
        assert labels.shape == (rows,)
        assert np.all((labels >= 0) & (labels <= 9))
    if "probabilities" in got and bool(np.all(np.abs(image) <= 1e4)):
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
        if "label" in got:
            chosen = probabilities[np.arange(rows), labels]
            np.testing.assert_array_equal(chosen, probabilities.max(axis=1))


def check_predict(
    request: predict_pb2.PredictRequest,
    code: grpc.StatusCode,
    details: str,
    response: predict_pb2.PredictResponse | None,
) -> None:
    """The rules for any Predict call that sent `request` (as the server parsed it)."""
    event(code.name)  # --hypothesis-show-statistics shows how often each code came back
    assert code in ALLOWED, f"{code.name}: {details}"
    if code is not grpc.StatusCode.OK:
        assert details, f"{code.name} without a message"
        return
    assert response is not None
    assert response.model == request.model
    assert response.version == 1
    assert response.request_id == request.request_id if request.request_id else response.request_id
    check_outputs(request.model, request.inputs, request.outputs, response.outputs)


def predict(stub: predict_pb2_grpc.PredictStub, request: predict_pb2.PredictRequest) -> None:
    """Send `request` and hold the answer to the rules."""
    try:
        response = stub.Predict(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        check_predict(request, *_status(error), None)
    else:
        check_predict(request, grpc.StatusCode.OK, "", response)


def assert_still_serving(stub: predict_pb2_grpc.PredictStub) -> None:
    """A good request on each model succeeds with correct values."""
    rng = np.random.default_rng()
    for model, shapes in INPUTS.items():
        inputs = [to_tensor(name, rng.uniform(0, 16, (3, *shape)).astype(np.float32)) for name, shape in shapes.items()]
        response = stub.Predict(predict_pb2.PredictRequest(model=model, inputs=inputs), timeout=CALL_TIMEOUT)
        check_outputs(model, inputs, (), response.outputs)


# -- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_channel(served: ServerThread) -> Iterator[grpc.Channel]:
    """One channel for the module: hypothesis runs many examples per test and fixtures are set up once."""
    with grpc.insecure_channel(served.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def predict_stub(fuzz_channel: grpc.Channel) -> predict_pb2_grpc.PredictStub:
    return predict_pb2_grpc.PredictStub(fuzz_channel)


@pytest.fixture(scope="module")
def stream_stub(fuzz_channel: grpc.Channel) -> stream_pb2_grpc.StreamStub:
    return stream_pb2_grpc.StreamStub(fuzz_channel)


# -- a. raw bytes -------------------------------------------------------------------------------------------


def test_random_bytes_as_the_body_always_get_a_status(
    fuzz_channel: grpc.Channel, predict_stub: predict_pb2_grpc.PredictStub
) -> None:
    raw_predict: grpc.UnaryUnaryMultiCallable[bytes, bytes] = fuzz_channel.unary_unary(
        "/tensorgate.v1.Predict/Predict", request_serializer=None, response_deserializer=None
    )

    @FUZZ
    @given(bodies())
    def check(body: bytes) -> None:
        try:
            parsed: predict_pb2.PredictRequest | None = predict_pb2.PredictRequest.FromString(body)
        except DecodeError:
            parsed = None
        try:
            reply = raw_predict(body, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            code, details = _status(error)
            if parsed is None:
                event(f"undecodable: {code.name}")
                assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
                assert "cannot be parsed" in details
            else:
                check_predict(parsed, code, details, None)
            return
        assert parsed is not None, "OK for a body that does not parse"
        check_predict(parsed, grpc.StatusCode.OK, "", predict_pb2.PredictResponse.FromString(reply))

    check()
    assert_still_serving(predict_stub)


# -- b. random field values ---------------------------------------------------------------------------------


def test_random_field_values_get_proper_statuses(predict_stub: predict_pb2_grpc.PredictStub) -> None:
    @FUZZ
    @given(predict_requests())
    def check(request: predict_pb2.PredictRequest) -> None:
        predict(predict_stub, request)
        assert_still_serving(predict_stub)

    check()


# -- c. streams ---------------------------------------------------------------------------------------------


def _stream(
    stub: stream_pb2_grpc.StreamStub, messages: Sequence[stream_pb2.StreamRequest]
) -> tuple[list[stream_pb2.StreamResponse], grpc.StatusCode, str]:
    responses: list[stream_pb2.StreamResponse] = []
    try:
        for response in stub.Stream(iter(messages), timeout=CALL_TIMEOUT):
            responses.append(response)
    except grpc.RpcError as error:
        return responses, *_status(error)
    return responses, grpc.StatusCode.OK, ""


def _good_frame(model: str, sequence: int) -> stream_pb2.StreamRequest:
    rng = np.random.default_rng(sequence)
    inputs = [to_tensor(n, rng.uniform(0, 16, (2, *s)).astype(np.float32)) for n, s in INPUTS[model].items()]
    return stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=sequence, inputs=inputs))


def test_random_frames_each_get_a_result_in_order(stream_stub: stream_pb2_grpc.StreamStub) -> None:
    @settings(FUZZ, max_examples=100)
    @given(stream_scripts())
    def check(script: tuple[stream_pb2.StreamConfig, list[stream_pb2.StreamRequest]]) -> None:
        config, messages = script
        last = _good_frame(config.model, 424242)
        sent = [stream_pb2.StreamRequest(config=config), *messages, last]
        responses, code, details = _stream(stream_stub, sent)
        assert code is grpc.StatusCode.OK, f"the stream ended {code.name}: {details}"
        frames = sent[1:]
        assert len(responses) == len(frames), "every message after the config gets exactly one result"
        outputs_valid = set(config.outputs) <= set(OUTPUTS[config.model])
        for message, response in zip(frames, responses, strict=True):
            is_frame = message.WhichOneof("kind") == "frame"
            assert response.sequence == (message.frame.sequence if is_frame else 0), "results out of order"
            event("frame error" if response.HasField("error") else "frame OK")
            if response.HasField("error"):
                assert response.error.code in ALLOWED_FRAME_CODES, response.error
                assert response.error.message
                assert not response.outputs
                if not is_frame:
                    assert response.error.code == INVALID_ARGUMENT
            else:
                assert is_frame, "a result with outputs for a message that carried no frame"
                assert response.version == 1
                check_outputs(config.model, message.frame.inputs, config.outputs, response.outputs)
        if outputs_valid:  # the stream is still open and serving: the good frame after the noise worked
            assert not responses[-1].HasField("error"), responses[-1].error

    check()


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (_good_frame("add_sub", 1), grpc.StatusCode.INVALID_ARGUMENT),
        (stream_pb2.StreamRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="nope")), grpc.StatusCode.NOT_FOUND),
        (
            stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="digits", version=2**62)),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="digits", version=-1)),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
    ids=["frame-first", "empty-first", "unknown-model", "huge-version", "negative-version"],
)
def test_a_bad_first_message_fails_the_stream(
    stream_stub: stream_pb2_grpc.StreamStub, first: stream_pb2.StreamRequest, expected: grpc.StatusCode
) -> None:
    responses, code, details = _stream(stream_stub, [first, _good_frame("digits", 2)])
    assert (code, responses) == (expected, []), details
    assert details


# -- d. huge shapes must not allocate -----------------------------------------------------------------------

#: Peak Python/numpy allocation allowed while the server refuses one tiny request that claims a huge shape.
#: numpy reports its buffers to tracemalloc, so allocating for the claimed shape (32 MiB for the smallest
#: case below) shows; the request itself, its parsing and the error are a few KiB.
ALLOCATION_BOUND = 4 * 1024 * 1024


def _huge(name: str, dtype: int, shape: list[int], raw: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=name, dtype=tensor_pb2.DataType.ValueType(dtype), shape=shape, raw=raw)


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        ("add_sub", [_huge("a", BYTES, [2**40], b"\0" * 4)]),
        ("add_sub", [_huge("a", BYTES, [2**22], b"\0" * 4)]),  # 4 Mi elements: 32 MiB of object pointers
        ("add_sub", [_huge("a", BYTES, [2**62, 2**62], b"")]),
        ("add_sub", [_huge("a", FP32, [2**40, 4], b"\0" * 16)]),
        ("add_sub", [_huge("a", FP32, [2**22, 4], b"\0" * 16), _huge("b", FP32, [2**22, 4], b"\0" * 16)]),
        ("add_sub", [_huge("a", FP32, [2**63 - 1, 2**63 - 1], b"")]),
        ("digits", [_huge("image", FP32, [2**31, 1, 8, 8], b"\0" * 256)]),
        ("digits", [_huge("image", FP32, [2**40, 1, 8, 8], b"")]),
    ],
    ids=["bytes-2^40", "bytes-2^22", "bytes-2^124", "fp32-2^40", "fp32-2^22", "fp32-2^126", "image-2^31", "image-2^40"],
)
def test_huge_shapes_are_refused_without_allocating(
    predict_stub: predict_pb2_grpc.PredictStub, model: str, inputs: list[tensor_pb2.Tensor]
) -> None:
    request = predict_pb2.PredictRequest(model=model, inputs=inputs)
    tracing = tracemalloc.is_tracing()  # already on (PYTHONTRACEMALLOC): leave it on
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline, _ = tracemalloc.get_traced_memory()
        with pytest.raises(grpc.RpcError) as caught:
            predict_stub.Predict(request, timeout=CALL_TIMEOUT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not tracing:
            tracemalloc.stop()
    code, details = _status(caught.value)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert peak - baseline < ALLOCATION_BOUND, f"{(peak - baseline) / 2**20:.1f} MiB allocated for a tiny request"


# -- shapes numpy cannot hold, undecodable stream messages ---------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        _huge("a", FP32, [2**62, 2**62, 0], b""),
        _huge("a", BYTES, [2**62, 4, 0], b""),
        _huge("a", FP32, [0, 2**63 - 1, 2**63 - 1], b""),
    ],
    ids=["fp32", "bytes", "leading-zero"],
)
def test_zero_element_shape_that_overflows_is_invalid_argument(
    predict_stub: predict_pb2_grpc.PredictStub, tensor: tensor_pb2.Tensor
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        predict_stub.Predict(predict_pb2.PredictRequest(model="add_sub", inputs=[tensor]), timeout=CALL_TIMEOUT)
    assert _status(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT, _status(caught.value)


def test_more_than_64_dims_is_invalid_argument(predict_stub: predict_pb2_grpc.PredictStub) -> None:
    tensor = _huge("a", FP32, [1] * 65, b"\0" * 4)
    with pytest.raises(grpc.RpcError) as caught:
        predict_stub.Predict(predict_pb2.PredictRequest(model="add_sub", inputs=[tensor]), timeout=CALL_TIMEOUT)
    assert _status(caught.value)[0] is grpc.StatusCode.INVALID_ARGUMENT, _status(caught.value)


def test_a_frame_with_an_overflowing_zero_element_shape_leaves_the_stream_open(
    stream_stub: stream_pb2_grpc.StreamStub,
) -> None:
    bad = stream_pb2.Frame(sequence=5, inputs=[_huge("a", FP32, [2**62, 2**62, 0], b"")])
    config = stream_pb2.StreamRequest(
        config=stream_pb2.StreamConfig(model="add_sub", drop_policy=stream_pb2.DROP_POLICY_BLOCK)
    )
    responses, code, details = _stream(
        stream_stub, [config, stream_pb2.StreamRequest(frame=bad), _good_frame("add_sub", 6)]
    )
    assert code is grpc.StatusCode.OK, f"{code.name}: {details}"
    assert [r.sequence for r in responses] == [5, 6]
    assert responses[0].error.code == INVALID_ARGUMENT
    assert not responses[1].HasField("error")


@pytest.mark.parametrize("position", [0, 1, 2])
def test_an_undecodable_stream_message_is_a_client_error(fuzz_channel: grpc.Channel, position: int) -> None:
    raw_stream: grpc.StreamStreamMultiCallable[bytes, bytes] = fuzz_channel.stream_stream(
        "/tensorgate.v1.Stream/Stream", request_serializer=None, response_deserializer=None
    )
    messages = [
        stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="add_sub")).SerializeToString(),
        _good_frame("add_sub", 1).SerializeToString(),
    ]
    messages.insert(position, b"\xff\xff\xff")
    with pytest.raises(grpc.RpcError) as caught:
        list(raw_stream(iter(messages), timeout=CALL_TIMEOUT))
    code, details = _status(caught.value)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "cannot be parsed" in details
