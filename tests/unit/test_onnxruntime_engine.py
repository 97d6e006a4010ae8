"""The ONNX Runtime engine on real (tiny) ONNX models: every dtype, instances on their own threads, errors."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto

from tensorgate.engines import EngineError, EngineSettings, create_engine
from tensorgate.engines.onnxruntime import OnnxRuntimeEngine
from tests.support.models import ONNX_TYPES, identity_model

# The numpy dtype each tensor data type travels as.
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@pytest.mark.parametrize("name", sorted(ONNX_TYPES))
async def test_every_dtype_round_trips(tmp_path: Path, name: str) -> None:
    onnx_type, dtype = ONNX_TYPES[name], NUMPY_TYPES[name]
    engine = create_engine("onnxruntime_onnx", EngineSettings(identity_model(tmp_path / "m.onnx", onnx_type)))
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
    path = identity_model(tmp_path / "m.onnx", TensorProto.FLOAT)
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
    path = identity_model(tmp_path / "m.onnx", TensorProto.FLOAT)
    engine = OnnxRuntimeEngine(EngineSettings(path, parameters={"execution_providers": "NoSuchProvider"}))
    with pytest.raises(EngineError, match="none of the execution providers"):
        await engine.load()


async def test_runtime_failure_is_an_engine_error(tmp_path: Path) -> None:
    engine = OnnxRuntimeEngine(EngineSettings(identity_model(tmp_path / "m.onnx", TensorProto.FLOAT)))
    await engine.load()
    try:
        with pytest.raises(EngineError, match="ONNX Runtime failed"):
            await engine.infer({"x": np.ones((1, 2), np.float64)})
    finally:
        await engine.close()


def test_unknown_platform() -> None:
    with pytest.raises(EngineError, match="no engine for platform 'caffe2'"):
        create_engine("caffe2", EngineSettings(Path("x")))
