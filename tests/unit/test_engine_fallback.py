"""The engine chain: a `tensorrt_plan` model that TensorRT cannot serve here is served by ONNX Runtime."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tensorgate.engines import EngineError, EngineSettings
from tensorgate.engines.fallback import load_engine
from tests.support.gpu_simulator import GpuSimulator
from tests.support.serving import EXAMPLE_MODELS

DIGITS_ONNX = EXAMPLE_MODELS / "digits" / "1" / "model.onnx"


def _version_dir(tmp_path: Path, *, with_onnx: bool = True) -> Path:
    directory = tmp_path / "digits" / "1"
    directory.mkdir(parents=True)
    if with_onnx:
        shutil.copy(DIGITS_ONNX, directory / "model.onnx")
    return directory


async def test_tensorrt_plan_falls_back_to_onnxruntime_with_the_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No `tensorrt` module here (FACTS.md), so TensorRT cannot run and model.onnx beside the plan serves.
    directory = _version_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tensorgate.engines.fallback"):
        loaded = await load_engine("tensorrt_plan", EngineSettings(model_file=directory / "model.plan"))
    try:
        assert any("serving" in r.message and "with onnxruntime instead" in r.message for r in caplog.records)
        assert loaded.platform == "onnxruntime_onnx"
        assert "tensorrt" in loaded.fallback_reason.lower()
        assert loaded.engine.description.startswith("onnxruntime")
        outputs = await loaded.engine.infer({"image": np.zeros((3, 1, 8, 8), np.float32)})
        assert outputs["probabilities"].shape == (3, 10)
    finally:
        await loaded.engine.close()


async def test_fallback_none_refuses_to_fall_back(tmp_path: Path) -> None:
    directory = _version_dir(tmp_path)
    settings = EngineSettings(model_file=directory / "model.plan", parameters={"fallback": "none"})
    with pytest.raises(EngineError, match='fallback: "none"'):
        await load_engine("tensorrt_plan", settings)


async def test_without_an_onnx_model_beside_the_plan_both_reasons_are_given(tmp_path: Path) -> None:
    directory = _version_dir(tmp_path, with_onnx=False)
    with pytest.raises(EngineError, match=r"no model\.onnx beside it to serve with onnxruntime"):
        await load_engine("tensorrt_plan", EngineSettings(model_file=directory / "model.plan"))


async def test_a_broken_fallback_model_names_both_failures(tmp_path: Path) -> None:
    directory = _version_dir(tmp_path, with_onnx=False)
    (directory / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(EngineError, match="the onnxruntime fallback failed too"):
        await load_engine("tensorrt_plan", EngineSettings(model_file=directory / "model.plan"))


async def test_an_unknown_fallback_choice_is_named(tmp_path: Path) -> None:
    directory = _version_dir(tmp_path)
    settings = EngineSettings(model_file=directory / "model.plan", parameters={"fallback": "cpu-please"})
    with pytest.raises(EngineError, match="'cpu-please'; it must be one of onnxruntime, none"):
        await load_engine("tensorrt_plan", settings)


async def test_an_engine_without_a_fallback_fails_as_itself(tmp_path: Path) -> None:
    directory = _version_dir(tmp_path, with_onnx=False)
    with pytest.raises(EngineError, match="no such model file"):
        await load_engine("onnxruntime_onnx", EngineSettings(model_file=directory / "model.onnx"))


async def test_a_bad_parameter_fails_the_load_instead_of_falling_back(tmp_path: Path) -> None:
    directory = _version_dir(tmp_path)
    settings = EngineSettings(model_file=directory / "model.plan", parameters={"pipeline_depth": "two"})
    with pytest.raises(EngineError, match="parameter 'pipeline_depth' must be an integer"):
        await load_engine("tensorrt_plan", settings)


async def test_a_plan_this_tensorrt_rejects_falls_back(tmp_path: Path, gpu_simulator: GpuSimulator) -> None:
    # On the CPU simulator of TensorRT: the plan deserializes to None (another TensorRT version, say).
    directory = _version_dir(tmp_path)
    (directory / "model.plan").write_bytes(b"a plan from another TensorRT")
    loaded = await load_engine("tensorrt_plan", EngineSettings(model_file=directory / "model.plan"))
    try:
        assert loaded.platform == "onnxruntime_onnx"
        assert "cannot deserialize this plan" in loaded.fallback_reason
    finally:
        await loaded.engine.close()


async def test_a_gpu_that_does_not_exist_fails_the_load(tmp_path: Path, gpu_simulator: GpuSimulator) -> None:
    directory = _version_dir(tmp_path)
    (directory / "model.plan").write_bytes(b"never read: the GPU check comes first")
    settings = EngineSettings(model_file=directory / "model.plan", devices=(3,))
    with pytest.raises(EngineError, match="GPU 3 is configured, but CUDA sees only 1"):
        await load_engine("tensorrt_plan", settings)
