"""Open Inference Protocol conversions: raw and typed tensors, parameters, classification, versions."""

from __future__ import annotations

import time
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest

from tensorgate.client.tensors import DTYPES
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.server.api.oip.infer import decode_request, encode_response, parse_version
from tensorgate.server.api.oip.tensors import (
    TYPED_FIELDS,
    classify,
    decode_inputs,
    decode_raw,
    decode_typed,
    encode_raw,
    encode_typed,
)
from tensorgate.server.errors import InvalidInputError
from tensorgate.server.inference import InferenceResult


def sample(datatype: str) -> npt.NDArray[Any]:
    """A [2, 3] array of `datatype` with extreme values where the type has them."""
    if datatype == "BYTES":
        return np.array([[b"a", b"", b"\x00\xff"], [b"long" * 10, b"x", "\u00e9".encode()]], dtype=np.object_)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dtype = DTYPES[datatype]
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0], [1, 2, info.max - 1]], dtype=dtype)
    return np.array([[1.5, -2.25, 0.0], [1e3, -1e-3, 7.0]], dtype=dtype)


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    array = sample(datatype)
    decoded = decode_raw("t", datatype, array.shape, encode_raw(array))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_raw_is_little_endian_and_bytes_are_length_prefixed() -> None:
    assert encode_raw(np.array([1, 256], np.dtype(">u2"))) == b"\x01\x00\x00\x01"
    assert encode_raw(np.array([b"ab", b""], np.object_)) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    decoded = decode_raw("t", "UINT16", [2], b"\x01\x00\x00\x01")
    assert decoded.tolist() == [1, 256]


@pytest.mark.parametrize("datatype", [name for name in DTYPES if name in TYPED_FIELDS])
def test_typed_round_trip(datatype: str) -> None:
    array = sample(datatype)
    contents = pb.InferTensorContents()
    encode_typed("t", array, contents)
    assert [field.name for field, _ in contents.ListFields()] == [TYPED_FIELDS[datatype]]
    decoded = decode_typed("t", datatype, array.shape, contents)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_is_raw_only(datatype: str) -> None:
    array = np.ones((2, 2), np.float16 if datatype == "FP16" else ml_dtypes.bfloat16)
    with pytest.raises(InvalidInputError, match=rf"output 't' is {datatype}.*raw"):
        encode_typed("t", array, pb.InferTensorContents())
    with pytest.raises(InvalidInputError, match=rf"input 't'.*{datatype}.*raw_input_contents"):
        decode_typed("t", datatype, [2, 2], pb.InferTensorContents(fp32_contents=[1, 1, 1, 1]))
    assert decode_typed("t", datatype, [0, 2], pb.InferTensorContents()).shape == (0, 2)


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", [2], b"\0" * 7, r"input 'x': 7 bytes of raw data, but shape \[2\] of FP32 needs 8"),
        ("FP32", [2, -1], b"", r"input 'x': shape \[2, -1\] has a negative dimension"),
        ("FLOAT32", [1], b"\0" * 4, r"input 'x': unknown datatype 'FLOAT32'"),
        ("BYTES", [3], b"\1\0\0\0a", r"input 'x': shape \[3\] needs 3 BYTES elements"),
        ("BYTES", [1], b"\x09\0\0\0a", r"input 'x': BYTES element 0 runs past the end"),
        ("BYTES", [1], b"\1\0\0\0ab", r"input 'x': 1 bytes left over"),
        ("FP32", [1] * 65, b"\0" * 4, r"input 'x': 65 dimensions"),
        ("FP32", [2**62, 2**62, 0], b"", r"input 'x': numpy cannot hold"),
        ("FP32", [2**40, 4], b"\0" * 16, r"input 'x': 16 bytes of raw data"),
    ],
)
def test_bad_raw_names_the_input(datatype: str, shape: list[int], raw: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_raw("x", datatype, shape, raw)


@pytest.mark.parametrize(
    ("datatype", "contents", "message"),
    [
        ("INT32", pb.InferTensorContents(int_contents=[1]), r"1 values in contents.int_contents, but shape \[2\]"),
        ("INT32", pb.InferTensorContents(int64_contents=[1, 2]), r"goes in contents.int_contents, not in int64"),
        ("UINT8", pb.InferTensorContents(uint_contents=[1, 256]), r"outside UINT8's range 0..255"),
        ("INT16", pb.InferTensorContents(int_contents=[-40000, 0]), r"outside INT16's range"),
    ],
)
def test_bad_typed_contents_name_the_input(datatype: str, contents: pb.InferTensorContents, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_typed("x", datatype, [2], contents)


def _request(**fields: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", **fields)
    request.inputs.add(name="a", datatype="INT32", shape=[2])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    return request


def test_decode_inputs_raw_or_typed_never_both() -> None:
    raw = _request(raw_input_contents=[encode_raw(np.array([1, 2], np.int32)), encode_raw(np.array([3], np.float32))])
    inputs = decode_inputs(raw)
    assert inputs["a"].tolist() == [1, 2]
    assert inputs["b"].tolist() == [3.0]
    assert not inputs["a"].flags.writeable  # a view of the request's bytes
    typed = _request()
    typed.inputs[0].contents.int_contents.extend([5, 6])
    typed.inputs[1].contents.fp32_contents.append(0.5)
    assert decode_inputs(typed)["a"].tolist() == [5, 6]
    both = _request(raw_input_contents=raw.raw_input_contents)
    both.inputs[1].contents.fp32_contents.append(0.5)
    with pytest.raises(InvalidInputError, match=r"input 'b' has typed contents but the request uses raw"):
        decode_inputs(both)
    short = _request(raw_input_contents=raw.raw_input_contents[:1])
    with pytest.raises(InvalidInputError, match=r"raw_input_contents has 1 entries for 2 inputs"):
        decode_inputs(short)
    empty_typed = _request()  # no contents at all: element counts do not match
    with pytest.raises(InvalidInputError, match=r"input 'a': 0 values"):
        decode_inputs(empty_typed)


def _parameters(request: pb.ModelInferRequest, **values: Any) -> pb.ModelInferRequest:
    for key, value in values.items():
        parameter = request.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        else:
            parameter.string_param = value
    return request


def _typed_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", model_version="2", id="r")
    request.inputs.add(name="a", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    return request


def test_priority_and_timeout_become_the_core_requests() -> None:
    core, options = decode_request(_typed_request(), request_id="r", call_deadline=None)
    assert (core.model, core.version, core.priority, core.deadline, core.outputs) == ("m", 2, 0, None, None)
    assert not options.typed
    request = _parameters(_typed_request(), priority=2, timeout=5_000_000)
    before = time.monotonic()
    core, _ = decode_request(request, request_id="r", call_deadline=None)
    assert core.priority == 2
    assert core.deadline is not None
    assert before + 5 <= core.deadline <= time.monotonic() + 5
    # The call's own deadline wins when it is sooner; a later one does not extend the timeout.
    core, _ = decode_request(request, request_id="r", call_deadline=before + 1)
    assert core.deadline == before + 1
    uint = _typed_request()
    uint.parameters["priority"].uint64_param = 1  # what tritonclient sends
    assert decode_request(uint, request_id="r", call_deadline=None)[0].priority == 1
    # tritonclient sends sequence_start/sequence_end false with sequence_id 0 never; false flags are harmless.
    assert decode_request(_parameters(_typed_request(), sequence_start=False), request_id="r", call_deadline=None)
    with pytest.raises(InvalidInputError, match="sequence batching"):
        decode_request(_parameters(_typed_request(), sequence_id=4), request_id="r", call_deadline=None)


def _outputs(request: pb.ModelInferRequest, **binary: bool | None) -> pb.ModelInferRequest:
    for name, value in binary.items():
        output = request.outputs.add(name=name)
        if value is not None:
            output.parameters["binary_data"].bool_param = value
    return request


@pytest.mark.parametrize(
    ("binary", "request_level", "typed"),
    [
        ({"x": None, "y": None}, None, False),
        ({"x": True, "y": None}, None, False),
        ({"x": False, "y": False}, None, True),
        ({}, False, True),
        ({"x": None}, True, False),
        ({"x": False, "y": True}, None, "mixed"),
        ({"x": False, "y": None}, None, "mixed"),
        ({"x": True}, False, "mixed"),
    ],
)
def test_binary_data_chooses_raw_or_typed_for_all_outputs(
    binary: dict[str, bool | None], request_level: bool | None, typed: bool | str
) -> None:
    request = _outputs(_typed_request(), **binary)
    if request_level is not None:
        request.parameters["binary_data_output"].bool_param = request_level
    if typed == "mixed":
        with pytest.raises(InvalidInputError, match="binary_data"):
            decode_request(request, request_id="r", call_deadline=None)
        return
    core, options = decode_request(request, request_id="r", call_deadline=None)
    assert options.typed is typed
    assert core.outputs == (tuple(binary) or None)


def test_encode_response_raw_and_typed() -> None:
    result = InferenceResult("m", 3, {"y": np.array([[1, 2]], np.int64), "s": np.array([b"q"], np.object_)})
    _, options = decode_request(_typed_request(), request_id="r", call_deadline=None)
    response = encode_response("r", result, options, batched=True)
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "r")
    headers = [(t.name, t.datatype, list(t.shape)) for t in response.outputs]
    assert headers == [("y", "INT64", [1, 2]), ("s", "BYTES", [1])]
    assert list(response.raw_output_contents) == [encode_raw(result.outputs["y"]), b"\1\0\0\0q"]
    options.typed = True
    response = encode_response("", result, options, batched=True)
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.int64_contents) == [1, 2]
    assert list(response.outputs[1].contents.bytes_contents) == [b"q"]


def test_classification_format() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    top = classify("p", scores, 2, batched=True, labels=["cat", "dog"])
    assert top.tolist() == [[b"0.700000:1:dog", b"0.200000:2"], [b"0.500000:0:cat", b"0.250000:1:dog"]]
    assert classify("p", np.array([3, 9, 1], np.int32), 5, batched=False).tolist() == [b"9:1", b"3:0", b"1:2"]
    with pytest.raises(InvalidInputError, match="output 'p' is BYTES; classification needs numbers"):
        classify("p", np.array([b"a"], np.object_), 1, batched=False)


@pytest.mark.parametrize(("text", "expected"), [("", None), ("1", 1), ("0042", 42)])
def test_versions(text: str, expected: int | None) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "1.0", "latest", " 1", "\u0661"])
def test_bad_versions(text: str) -> None:
    with pytest.raises(InvalidInputError, match="not a version number"):
        parse_version(text)
