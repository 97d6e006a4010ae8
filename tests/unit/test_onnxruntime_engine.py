"""The ONNX Runtime engine on real (tiny) ONNX models: every dtype, instances on their own threads, errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tensorgate.engines import EngineError, EngineSettings, create_engine
from tensorgate.engines.onnxruntime import OnnxRuntimeEngine

ONNX_TYPES: dict[str, tuple[int, Any]] = {
    "BOOL": (TensorProto.BOOL, np.bool_),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "UINT16": (TensorProto.UINT16, np.uint16),
    "UINT32": (TensorProto.UINT32, np.uint32),
    "UINT64": (TensorProto.UINT64, np.uint64),
    "INT8": (TensorProto.INT8, np.int8),
    "INT16": (TensorProto.INT16, np.int16),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "BF16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP64": (TensorProto.DOUBLE, np.float64),
    "BYTES": (TensorProto.STRING, np.object_),
}


def _identity_model(path: Path, onnx_type: int) -> Path:
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


@pytest.mark.parametrize("name", sorted(ONNX_TYPES))
async def test_every_dtype_round_trips(tmp_path: Path, name: str) -> None:
    onnx_type, dtype = ONNX_TYPES[name]
    engine = create_engine("onnxruntime_onnx", EngineSettings(_identity_model(tmp_path / "m.onnx", onnx_type)))
    await engine.load()
    try:
        (spec,) = engine.inputs
        assert spec.dtype == np.dtype(dtype)
        assert spec.shape == (-1, 2)
        if dtype is np.object_:
            value = np.array([[b"a", b"bc"], [b"", b"\xc3\xa9"]], dtype=object)
        else:
            value = (np.arange(4) % 2).astype(dtype).reshape(2, 2)
        await engine.warmup()
        result = (await engine.infer({"x": value}))["y"]
        assert result.dtype == value.dtype
        np.testing.assert_array_equal(result, value)
    finally:
        await engine.close()


async def test_each_instance_runs_on_its_own_thread(tmp_path: Path) -> None:
    path = _identity_model(tmp_path / "m.onnx", TensorProto.FLOAT)
    engine = OnnxRuntimeEngine(EngineSettings(path, instance_count=3))
    await engine.load()
    seen: dict[int, str] = {}
    for index, session in enumerate(engine._sessions):
        original = session.run

        def recording(*args: Any, _index: int = index, _run: Any = original) -> Any:
            seen[_index] = threading.current_thread().name
            return _run(*args)

        session.run = recording
    x = {"x": np.ones((1, 2), np.float32)}
    await asyncio.gather(*(engine.infer(x, instance=i) for i in range(3)))
    await engine.close()
    assert sorted(seen) == [0, 1, 2]
    assert len(set(seen.values())) == 3
    assert threading.main_thread().name not in seen.values()


async def test_broken_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not onnx")
    engine = OnnxRuntimeEngine(EngineSettings(path))
    with pytest.raises(EngineError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        await engine.load()


async def test_missing_file_and_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="no such model file"):
        await OnnxRuntimeEngine(EngineSettings(tmp_path / "absent.onnx")).load()
    with pytest.raises(EngineError, match="instance_count must be at least 1"):
        OnnxRuntimeEngine(EngineSettings(tmp_path / "m.onnx", instance_count=0))
    path = _identity_model(tmp_path / "m.onnx", TensorProto.FLOAT)
    engine = OnnxRuntimeEngine(EngineSettings(path, parameters={"execution_providers": "NoSuchProvider"}))
    with pytest.raises(EngineError, match="none of the execution providers"):
        await engine.load()


async def test_runtime_failure_is_an_engine_error(tmp_path: Path) -> None:
    engine = OnnxRuntimeEngine(EngineSettings(_identity_model(tmp_path / "m.onnx", TensorProto.FLOAT)))
    await engine.load()
    try:
        with pytest.raises(EngineError, match="ONNX Runtime failed"):
            await engine.infer({"x": np.ones((1, 2), np.float64)})
    finally:
        await engine.close()


def test_unknown_platform() -> None:
    with pytest.raises(EngineError, match="no engine for platform 'caffe2'"):
        create_engine("caffe2", EngineSettings(Path("x")))
