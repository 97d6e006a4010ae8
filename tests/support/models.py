"""Tiny ONNX models built on the fly for tests."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

__all__ = ["ONNX_TYPES", "identity_model"]

#: Each tensor data type name and the ONNX element type that carries it.
ONNX_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "BF16": TensorProto.BFLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def identity_model(path: Path, onnx_type: int) -> Path:
    """Write y = x over [batch, 2] tensors of one ONNX element type to `path` (IR 9, opset 17)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", onnx_type, ["batch", 2])],
        [helper.make_tensor_value_info("y", onnx_type, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
