"""The wire codec: numpy <-> Tensor for every dtype, and clear errors for bad tensors."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from tensorgate.client.tensors import DTYPES, TensorFormatError, dtype_name, from_tensor, to_tensor
from tensorgate.v1 import tensor_pb2


@pytest.mark.parametrize("name", sorted(set(DTYPES) - {"BYTES"}))
def test_round_trip_every_numeric_dtype(name: str) -> None:
    array = (np.arange(12) % 2 if name == "BOOL" else np.arange(12)).astype(DTYPES[name]).reshape(3, 4)
    tensor = to_tensor("x", array)
    assert tensor.dtype == tensor_pb2.DataType.Value(f"DATA_TYPE_{name}")
    assert len(tensor.raw) == 12 * DTYPES[name].itemsize
    decoded = from_tensor(tensor)
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_bytes_round_trip_and_layout() -> None:
    array = np.array([[b"ab", b""], [b"\x00\xff", "caf\u00e9"]], dtype=object)
    tensor = to_tensor("s", array)
    assert tensor.raw.startswith(b"\x02\x00\x00\x00ab\x00\x00\x00\x00")
    decoded = from_tensor(tensor)
    assert decoded.shape == (2, 2)
    assert decoded.tolist() == [[b"ab", b""], [b"\x00\xff", "caf\u00e9".encode()]]


def test_big_endian_input_is_sent_little_endian() -> None:
    array = np.arange(4, dtype=">i4")
    assert to_tensor("x", array).raw == np.arange(4, dtype="<i4").tobytes()


def test_decoding_does_not_copy() -> None:
    decoded = from_tensor(to_tensor("x", np.zeros(1000, np.float32)))
    assert not decoded.flags.owndata
    assert not decoded.flags.writeable


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dtype": 0, "shape": [1], "raw": b"\0"}, "dtype is not set"),
        ({"dtype": 999, "shape": [1], "raw": b"\0"}, "unknown dtype enum value 999"),
        ({"dtype": tensor_pb2.DATA_TYPE_FP32, "shape": [2, -1], "raw": b""}, "negative dimension"),
        ({"dtype": tensor_pb2.DATA_TYPE_FP32, "shape": [3], "raw": b"\0" * 8}, "8 bytes of data"),
        ({"dtype": tensor_pb2.DATA_TYPE_BYTES, "shape": [2**40], "raw": b""}, "cannot hold them"),
        ({"dtype": tensor_pb2.DATA_TYPE_BYTES, "shape": [1], "raw": b"\x05\0\0\0ab"}, "runs past the end"),
        ({"dtype": tensor_pb2.DATA_TYPE_BYTES, "shape": [1], "raw": b"\x01\0\0\0abc"}, "left over"),
        ({"dtype": tensor_pb2.DATA_TYPE_FP32, "shape": [1] * 65, "raw": b"\0" * 4}, "65 dimensions"),
        ({"dtype": tensor_pb2.DATA_TYPE_FP32, "shape": [2**62, 2**62, 0], "raw": b""}, "numpy cannot hold"),
    ],
)
def test_bad_tensors_name_the_problem(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(TensorFormatError, match="tensor 'bad'") as caught:
        from_tensor(tensor_pb2.Tensor(name="bad", **fields))
    assert message in str(caught.value)


def test_element_limit() -> None:
    with pytest.raises(TensorFormatError, match="more than the limit of 10"):
        from_tensor(to_tensor("x", np.zeros(11, np.uint8)), max_elements=10)


def test_dtype_names() -> None:
    assert dtype_name(np.float32) == "FP32"
    assert dtype_name(ml_dtypes.bfloat16) == "BF16"
    assert dtype_name(np.dtype("U3")) == "BYTES"
    with pytest.raises(TensorFormatError, match="complex64"):
        dtype_name(np.complex64)
