"""The bundled example models (examples/models) and the benchmark model builders (bench/models.py).

Fast by design: nothing is trained and ResNet-18 is never built here; the MLP builder stands in for the
builders' shared machinery (seeding, IR pinning, skip-if-unchanged).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format

from tensorgate.v1 import model_config_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples" / "models"
# onnxruntime 1.31 reads IR <= 13 and older runtimes less: every model we ship pins 10 or lower.
MAX_IR_VERSION = 10


def _load(relative: str, name: str) -> ModuleType:
    """Import a source file by path: examples/ is not a package and the repo root need not be on sys.path.

    A private module name keeps it from shadowing a regular ``import bench.models`` elsewhere in the run.
    """
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / relative)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_digits() -> ModuleType:
    return _load("examples/build_digits.py", "_build_digits_under_test")


@pytest.fixture(scope="module")
def bench_models() -> ModuleType:
    return _load("bench/models.py", "_bench_models_under_test")


def _session(path: Path | bytes) -> ort.InferenceSession:
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=["CPUExecutionProvider"])


def _parse_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_digits_model_scores_what_the_build_recorded(build_digits: ModuleType) -> None:
    path = EXAMPLES / "digits" / "1" / "model.onnx"
    assert onnx.load(str(path)).ir_version <= MAX_IR_VERSION
    session = _session(path)
    images, labels = build_digits.held_out_digits()
    assert images.dtype == np.float32
    assert images.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64
    assert labels.shape == (len(images),)

    probabilities, predicted = session.run(["probabilities", "label"], {"image": images})
    accuracy = float(np.mean(predicted == labels))
    recorded = float(session.get_modelmeta().custom_metadata_map[build_digits.ACCURACY_KEY])
    assert accuracy == pytest.approx(recorded, abs=1e-6)
    assert accuracy >= 0.9
    # The two outputs must agree: label is the argmax of the same logits the probabilities come from.
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), predicted)


def test_digits_config_parses_and_matches_the_model() -> None:
    config = _parse_config((EXAMPLES / "digits" / "config.pbtxt").read_text())
    assert config.name == "digits"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    cpu = model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, cpu)]

    # The config's tensors are the model's, minus the leading (symbolic) batch dimension.
    session = _session(EXAMPLES / "digits" / "1" / "model.onnx")
    model_inputs = {t.name: t.shape[1:] for t in session.get_inputs()}
    model_outputs = {t.name: t.shape[1:] for t in session.get_outputs()}
    assert {t.name: list(t.dims) for t in config.input} == model_inputs
    assert {t.name: list(t.dims) for t in config.output} == model_outputs
    assert all(t.shape[0] == "batch" for t in [*session.get_inputs(), *session.get_outputs()])


def test_add_sub_model_ships_without_config() -> None:
    model_dir = EXAMPLES / "add_sub"
    assert not (model_dir / "config.pbtxt").exists()
    assert onnx.load(str(model_dir / "1" / "model.onnx")).ir_version <= MAX_IR_VERSION
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.full((3, 4), 0.5, dtype=np.float32)
    total, difference = _session(model_dir / "1" / "model.onnx").run(["sum", "difference"], {"a": a, "b": b})
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(difference, a - b)


def test_mlp_builder_is_deterministic_and_skips_unchanged(bench_models: ModuleType, tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "model.onnx", tmp_path / "b" / "model.onnx"
    assert bench_models.build_mlp(first) is True
    assert bench_models.build_mlp(second) is True
    data = first.read_bytes()
    assert data == second.read_bytes()

    mtime = first.stat().st_mtime_ns
    assert bench_models.build_mlp(first) is False  # same content: left alone
    assert first.stat().st_mtime_ns == mtime

    assert onnx.load_from_string(data).ir_version <= MAX_IR_VERSION
    (y,) = _session(data).run(["y"], {"x": np.ones((5, 16), dtype=np.float32)})
    assert y.shape == (5, 8)
    assert np.isfinite(y).all()


@pytest.mark.parametrize(("name", "max_batch_size"), [("resnet18", 8), ("mlp", 64)])
def test_bench_configs_parse(bench_models: ModuleType, name: str, max_batch_size: int) -> None:
    _, config_text = bench_models.MODELS[name]
    config = _parse_config(config_text)
    assert config.name == name
    assert config.max_batch_size == max_batch_size
    assert config.HasField("dynamic_batching")
    assert [g.count for g in config.instance_group] == [1]
