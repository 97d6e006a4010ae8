"""numpy arrays to and from the wire's `Tensor` message, shared by the client and the server.

Tensors travel as raw little-endian row-major bytes. BYTES elements are each a 4-byte little-endian length
followed by the bytes; BF16 uses `ml_dtypes.bfloat16`. Decoding uses `np.frombuffer` on the received bytes
(no Python lists, no copy), so a decoded array is read-only.
"""

from __future__ import annotations

import struct
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from tensorgate.v1 import tensor_pb2

__all__ = [
    "DTYPES",
    "TensorFormatError",
    "dtype_from_name",
    "dtype_name",
    "from_tensor",
    "from_wire_dtype",
    "to_tensor",
    "to_wire_dtype",
]

#: Data type names (the Open Inference Protocol's spelling) and the numpy dtype that carries each.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NAMES_BY_DTYPE: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DTYPES.items()}
_LENGTH = struct.Struct("<I")
# numpy's limit on the number of dimensions (NPY_MAXDIMS in numpy 2).
_MAX_DIMS = 64


class TensorFormatError(ValueError):
    """A tensor cannot be encoded or decoded; the message names the tensor and what is wrong."""


def dtype_from_name(name: str) -> np.dtype[Any]:
    """The numpy dtype for a data type name such as "FP32"."""
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorFormatError(f"unknown data type {name!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: npt.DTypeLike) -> str:
    """The data type name of a numpy dtype (str and bytes arrays are BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in "SUO":
        return "BYTES"
    try:
        return _NAMES_BY_DTYPE[dt.newbyteorder("=") if dt.byteorder == ">" else dt]
    except KeyError:
        raise TensorFormatError(f"numpy dtype {dt} has no tensor data type") from None


# Enum lookups by descriptor cost microseconds per tensor; these tables are read on every request.
_WIRE_BY_NAME: dict[str, tensor_pb2.DataType.ValueType] = {
    name: tensor_pb2.DataType.Value(f"DATA_TYPE_{name}") for name in DTYPES
}
_NAME_BY_WIRE: dict[int, str] = {value: name for name, value in _WIRE_BY_NAME.items()}
# The dtype raw bytes are read as: little-endian, as the wire promises.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {name: dtype.newbyteorder("<") for name, dtype in DTYPES.items()}


def to_wire_dtype(name: str) -> tensor_pb2.DataType.ValueType:
    """The `tensorgate.v1.DataType` enum value for a data type name."""
    try:
        return _WIRE_BY_NAME[name]
    except KeyError:
        raise TensorFormatError(f"unknown data type {name!r}; known: {', '.join(DTYPES)}") from None


def from_wire_dtype(value: int) -> str:
    """The data type name of a `tensorgate.v1.DataType` enum value."""
    try:
        return _NAME_BY_WIRE[value]
    except KeyError:
        if value == tensor_pb2.DATA_TYPE_UNSPECIFIED:
            raise TensorFormatError("dtype is not set") from None
        raise TensorFormatError(f"unknown dtype enum value {value}") from None


def encode_bytes_elements(array: npt.NDArray[Any]) -> bytes:
    """Serialize a BYTES array: each element as a 4-byte little-endian length, then its bytes."""
    parts: list[bytes] = []
    for item in array.ravel(order="C"):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes_elements(raw: bytes, count: int, name: str) -> npt.NDArray[np.object_]:
    """Parse `count` length-prefixed elements from `raw` into an object array of bytes."""
    out = np.empty(count, dtype=np.object_)
    offset = 0
    view = memoryview(raw)
    for index in range(count):
        if offset + 4 > len(raw):
            raise TensorFormatError(f"tensor {name!r}: BYTES data ends inside the length of element {index}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorFormatError(f"tensor {name!r}: BYTES element {index} runs past the end of the data")
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise TensorFormatError(f"tensor {name!r}: {len(raw) - offset} bytes left over after {count} BYTES elements")
    return out


def to_tensor(name: str, value: npt.ArrayLike) -> tensor_pb2.Tensor:
    """Encode an array (or anything numpy can make one of) as a `Tensor` message."""
    array = np.asarray(value)
    dtype = dtype_name(array.dtype)
    if dtype == "BYTES":
        raw = encode_bytes_elements(array)
    else:
        # Little-endian, C order, as the wire promises; a no-op for the usual native-order contiguous array.
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        raw = array.tobytes()
    return tensor_pb2.Tensor(name=name, dtype=to_wire_dtype(dtype), shape=array.shape, raw=raw)


def from_tensor(tensor: tensor_pb2.Tensor, *, max_elements: int | None = None) -> npt.NDArray[Any]:
    """Decode a `Tensor` message, checking its shape against its bytes.

    Raises TensorFormatError naming the tensor when the dtype is unset or unknown, a dimension is negative, the
    element count exceeds `max_elements`, or the byte length does not match shape x itemsize.
    """
    name = tensor.name
    try:
        dtype = _WIRE_DTYPES[from_wire_dtype(tensor.dtype)]
    except TensorFormatError as exc:
        raise TensorFormatError(f"tensor {name!r}: {exc}") from None
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise TensorFormatError(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
    if len(shape) > _MAX_DIMS:
        raise TensorFormatError(f"tensor {name!r}: {len(shape)} dimensions, more than numpy's {_MAX_DIMS}")
    count = 1
    for dim in shape:
        count *= dim
    if max_elements is not None and count > max_elements:
        raise TensorFormatError(
            f"tensor {name!r}: shape {list(shape)} has {count} elements, more than the limit of {max_elements}"
        )
    raw = tensor.raw
    if dtype == np.object_:
        # Every element takes at least its 4-byte length: a larger count is a lie, found before allocating.
        if count * 4 > len(raw):
            raise TensorFormatError(
                f"tensor {name!r}: shape {list(shape)} needs {count} BYTES elements, but {len(raw)} bytes of "
                f"data cannot hold them"
            )
        return _reshape(decode_bytes_elements(raw, count, name), shape, name)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorFormatError(
            f"tensor {name!r}: {len(raw)} bytes of data, but shape {list(shape)} of {dtype_name(dtype)} "
            f"needs {expected}"
        )
    return _reshape(np.frombuffer(raw, dtype=dtype), shape, name)


def _reshape(flat: npt.NDArray[Any], shape: tuple[int, ...], name: str) -> npt.NDArray[Any]:
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        # Zero-element shapes whose other dimensions overflow numpy's index type, e.g. [2**62, 2**62, 0].
        raise TensorFormatError(f"tensor {name!r}: numpy cannot hold shape {list(shape)}: {exc}") from None
