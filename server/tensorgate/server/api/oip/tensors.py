"""Open Inference Protocol tensors <-> numpy: raw bytes and typed contents, both ways, and classification.

Raw data (`raw_input_contents`, `raw_output_contents`) is little-endian, row-major, unpadded; BYTES elements
are each a 4-byte little-endian length and the bytes. Raw inputs are decoded with `np.frombuffer` (no copy, no
Python lists). Typed contents (`InferTensorContents`) are repeated protobuf fields, one per datatype family;
FP16 and BF16 have none, so they travel raw only. Every problem is an InvalidInputError naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorgate.client.tensors import (
    DTYPES,
    TensorFormatError,
    decode_bytes_elements,
    dtype_name,
    encode_bytes_elements,
)
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.server.errors import InvalidInputError

__all__ = [
    "TYPED_FIELDS",
    "classify",
    "decode_inputs",
    "decode_raw",
    "decode_typed",
    "encode_raw",
    "encode_typed",
]

Array = npt.NDArray[Any]

#: The InferTensorContents field that carries each datatype (FP16 and BF16 have none).
TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The dtype typed values are read as before narrowing (int_contents is int32, uint_contents uint32).
_WIDE: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype(np.uint32),
    "UINT16": np.dtype(np.uint32),
    "INT8": np.dtype(np.int32),
    "INT16": np.dtype(np.int32),
}
# The dtype raw bytes are read as: little-endian, as the protocol says.
_RAW_DTYPES: dict[str, np.dtype[Any]] = {name: dtype.newbyteorder("<") for name, dtype in DTYPES.items()}
# numpy's limit on the number of dimensions (NPY_MAXDIMS in numpy 2).
_MAX_DIMS = 64


def _checked_shape(kind: str, name: str, datatype: str, shape: Sequence[int]) -> tuple[np.dtype[Any], int]:
    """The raw dtype and element count of a tensor header, or InvalidInputError naming the tensor."""
    dtype = _RAW_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(f"{kind} {name!r}: unknown datatype {datatype!r} (known: {', '.join(DTYPES)})")
    if any(dim < 0 for dim in shape):
        raise InvalidInputError(f"{kind} {name!r}: shape {list(shape)} has a negative dimension")
    if len(shape) > _MAX_DIMS:
        raise InvalidInputError(f"{kind} {name!r}: {len(shape)} dimensions, more than numpy's {_MAX_DIMS}")
    return dtype, math.prod(shape)


def _reshape(flat: Array, shape: Sequence[int], name: str) -> Array:
    try:
        return flat.reshape(shape)
    except ValueError as exc:
        # Zero-element shapes whose other dimensions overflow numpy's index type, e.g. [2**62, 2**62, 0].
        raise InvalidInputError(f"input {name!r}: numpy cannot hold shape {list(shape)}: {exc}") from None


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Array:
    """One input from its raw bytes (a read-only view of them, except BYTES)."""
    dtype, count = _checked_shape("input", name, datatype, shape)
    if dtype == np.object_:
        # Every element takes at least its 4-byte length: a larger count is a lie, found before allocating.
        if count * 4 > len(raw):
            raise InvalidInputError(
                f"input {name!r}: shape {list(shape)} needs {count} BYTES elements, but {len(raw)} bytes of raw "
                "data cannot hold them"
            )
        try:
            flat = decode_bytes_elements(raw, count, name)
        except TensorFormatError as exc:
            raise InvalidInputError(str(exc).replace("tensor ", "input ", 1)) from None
        return _reshape(flat, shape, name)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInputError(
            f"input {name!r}: {len(raw)} bytes of raw data, but shape {list(shape)} of {datatype} needs {expected}"
        )
    return _reshape(np.frombuffer(raw, dtype=dtype), shape, name)


def decode_typed(name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> Array:
    """One input from its typed contents, which must hold exactly the shape's element count."""
    dtype, count = _checked_shape("input", name, datatype, shape)
    field = TYPED_FIELDS.get(datatype)
    present = [descriptor.name for descriptor, _ in contents.ListFields()]
    if field is None:
        if count or present:
            raise InvalidInputError(
                f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents"
            )
        return np.empty(shape, dtype=dtype)
    stray = [other for other in present if other != field]
    if stray:
        raise InvalidInputError(f"input {name!r}: {datatype} data goes in contents.{field}, not in {stray[0]}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: {len(values)} values in contents.{field}, but shape {list(shape)} needs {count}"
        )
    if dtype == np.object_:
        flat = np.empty(count, dtype=np.object_)
        for index, item in enumerate(values):
            flat[index] = item
        return _reshape(flat, shape, name)
    wide = _WIDE.get(datatype)
    if wide is None:
        return _reshape(np.fromiter(values, dtype=dtype.newbyteorder("="), count=count), shape, name)
    flat = np.fromiter(values, dtype=wide, count=count)
    limits = np.iinfo(dtype)
    if count and (flat.min() < limits.min or flat.max() > limits.max):
        raise InvalidInputError(
            f"input {name!r}: contents.{field} holds values outside {datatype}'s range {limits.min}..{limits.max}"
        )
    return _reshape(flat.astype(dtype.newbyteorder("=")), shape, name)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Array]:
    """Every input of a request, raw or typed (not both); InvalidInputError naming the tensor."""
    inputs: dict[str, Array] = {}
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(request.inputs):
            raise InvalidInputError(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                "it needs one per input, in the order of `inputs`"
            )
        for tensor, data in zip(request.inputs, raw, strict=True):
            if tensor.HasField("contents"):
                raise InvalidInputError(
                    f"input {tensor.name!r} has typed contents but the request uses raw_input_contents; "
                    "a request carries one or the other"
                )
            if tensor.name in inputs:
                raise InvalidInputError(f"input {tensor.name!r} is given more than once")
            inputs[tensor.name] = decode_raw(tensor.name, tensor.datatype, tensor.shape, data)
        return inputs
    for tensor in request.inputs:
        if tensor.name in inputs:
            raise InvalidInputError(f"input {tensor.name!r} is given more than once")
        inputs[tensor.name] = decode_typed(tensor.name, tensor.datatype, tensor.shape, tensor.contents)
    return inputs


def encode_raw(array: Array) -> bytes:
    """An array's raw bytes: little-endian row-major, or length-prefixed elements for BYTES."""
    if array.dtype == np.object_:
        return encode_bytes_elements(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_typed(name: str, array: Array, contents: pb.InferTensorContents) -> None:
    """Fill `contents` with an output's values; InvalidInputError for FP16/BF16, which have no typed field."""
    datatype = dtype_name(array.dtype)
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidInputError(
            f"output {name!r} is {datatype}, which has no typed contents field; ask for it as raw data "
            "(binary_data true, the default)"
        )
    flat = array.ravel()
    if array.dtype == np.object_:
        getattr(contents, field).extend(item.encode() if isinstance(item, str) else bytes(item) for item in flat)
    else:
        getattr(contents, field).extend(flat.tolist())


def classify(name: str, array: Array, count: int, *, batched: bool, labels: Sequence[str] = ()) -> Array:
    """Triton's `classification` output: the `count` highest values per batch row, as BYTES "value:index[:label]".

    The result has shape [rows, k] for a batched model ([k] otherwise), k = min(count, classes), values in
    descending order (ties by index). Floats print with six decimals, integers as they are.
    """
    if array.dtype == np.object_ or array.dtype == np.bool_:
        raise InvalidInputError(f"output {name!r} is {dtype_name(array.dtype)}; classification needs numbers")
    rows = array.reshape(array.shape[0] if batched and array.ndim else 1, -1)
    k = min(count, rows.shape[1])
    scores = rows.astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    floating = np.issubdtype(array.dtype, np.floating)
    out = np.empty(order.shape, dtype=np.object_)
    for row, indices in enumerate(order.tolist()):
        for column, index in enumerate(indices):
            value = rows[row, index]
            text = f"{float(value):f}" if floating else str(int(value))
            label = f":{labels[index]}" if index < len(labels) else ""
            out[row, column] = f"{text}:{index}{label}".encode()
    return out if batched else out[0]
