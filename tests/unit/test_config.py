"""config.pbtxt parsing and its reconciliation with what the engine reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tensorgate.engines import TensorSpec
from tensorgate.server.errors import InvalidInputError, ModelConfigError
from tensorgate.server.repository.config import ModelSignature, read_config, reconcile

F32 = np.dtype(np.float32)
ENGINE_IN = (TensorSpec("x", F32, (-1, 3, -1)),)
ENGINE_OUT = (TensorSpec("y", F32, (-1, 2)),)


def _model_dir(tmp_path: Path, text: str | None, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if text is not None:
        (folder / "config.pbtxt").write_text(text)
    return folder


def test_triton_style_config_parses(tmp_path: Path) -> None:
    config = read_config(
        _model_dir(
            tmp_path,
            """
            name: "m"
            backend: "onnxruntime"
            max_batch_size: 8
            input [{ name: "x" data_type: TYPE_FP32 dims: [3, 5] }]
            dynamic_batching {
              preferred_batch_size: [4, 8]
              max_queue_delay_microseconds: 100
              priority_levels: 2
              default_priority_level: 2
              default_queue_policy { max_queue_size: 7 default_timeout_microseconds: 5000 }
            }
            instance_group [{ count: 2 kind: KIND_CPU }]
            version_policy { latest { num_versions: 2 } }
            parameters { key: "intra_op_threads" value: { string_value: "1" } }
            """,
        )
    )
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 7
    assert config.parameters["intra_op_threads"].string_value == "1"


def test_missing_file_gives_an_empty_config_named_after_the_folder(tmp_path: Path) -> None:
    assert read_config(_model_dir(tmp_path, None, "named")).name == "named"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("max_batch_sise: 4", 'no field named "max_batch_sise"'),
        ("max_batch_size: -1", "max_batch_size must be >= 0"),
        ('name: "other"', "differs from the directory name"),
        ('platform: "pytorch_libtorch"', "platform 'pytorch_libtorch' is not one of"),
        ('backend: "python"', "no engine for backend 'python'"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [8] }", "preferred_batch_size 8"),
        ("dynamic_batching { priority_levels: 2 default_priority_level: 3 }", "default_priority_level 3"),
        ('input [{ name: "x" dims: [3] }]', "input 'x' has no data_type"),
        ('input [{ name: "x" data_type: TYPE_FP32 dims: [-2] }]', "dimension below -1"),
        ("version_policy { specific { } }", "lists no versions"),
        ("max_batch_size: {", "config.pbtxt:1"),
    ],
)
def test_bad_config_names_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        read_config(_model_dir(tmp_path, text))
    assert "m/config.pbtxt" in str(caught.value)
    assert problem in str(caught.value)


def _reconcile(tmp_path: Path, text: str | None, **kwargs: object) -> ModelSignature:
    folder = _model_dir(tmp_path, text)
    signature, _ = reconcile(
        read_config(folder),
        kwargs.get("inputs", ENGINE_IN),  # type: ignore[arg-type]
        ENGINE_OUT,
        where=folder / "config.pbtxt",
        has_config_file=text is not None,
        default_max_batch_size=16,
    )
    return signature


def test_without_config_a_variable_first_dimension_batches(tmp_path: Path) -> None:
    signature = _reconcile(tmp_path, None)
    assert signature.max_batch_size == 16
    assert signature.inputs == ENGINE_IN


def test_without_config_a_fixed_first_dimension_does_not_batch(tmp_path: Path) -> None:
    signature = _reconcile(tmp_path, None, inputs=(TensorSpec("x", F32, (2, 3)),))
    assert signature.max_batch_size == 0


def test_config_dims_narrow_the_model_shape(tmp_path: Path) -> None:
    text = 'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_FP32 dims: [3, 5] }]'
    assert _reconcile(tmp_path, text).inputs == (TensorSpec("x", F32, (-1, 3, 5)),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'max_batch_size: 4\ninput [{ name: "z" data_type: TYPE_FP32 dims: [3, 5] }]',
            "input 'z' is not in the model",
        ),
        (
            'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_INT8 dims: [3, 5] }]',
            "INT8 in the config but FP32",
        ),
        (
            'max_batch_size: 4\ninput [{ name: "x" data_type: TYPE_FP32 dims: [4, 5] }]',
            "dims [4, 5] in the config",
        ),
        (
            'max_batch_size: 0\ninput [{ name: "x" data_type: TYPE_FP32 dims: [3, 5] }]',
            "dims [3, 5] in the config",
        ),
    ],
)
def test_config_that_contradicts_the_model(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ModelConfigError, match=r"config\.pbtxt") as caught:
        _reconcile(tmp_path, text)
    assert problem in str(caught.value)


def test_batching_config_needs_a_variable_first_dimension(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="without a variable first"):
        _reconcile(tmp_path, "max_batch_size: 4", inputs=(TensorSpec("x", F32, (2, 3)),))


def test_check_request() -> None:
    signature = ModelSignature(4, (TensorSpec("x", F32, (-1, 3)),), ENGINE_OUT)
    signature.check_request({"x": np.zeros((2, 3), np.float32)}, ["y"])
    cases: list[tuple[dict[str, np.ndarray], list[str] | None, str]] = [
        ({}, None, "missing input 'x'"),
        ({"x": np.zeros((2, 3), np.int32)}, None, "dtype INT32"),
        ({"x": np.zeros((2, 4), np.float32)}, None, "shape [2, 4]"),
        ({"x": np.zeros((5, 3), np.float32)}, None, "batch of 5 rows"),
        ({"x": np.zeros((1, 3), np.float32), "w": np.zeros(1)}, None, "unknown input 'w'"),
        ({"x": np.zeros((1, 3), np.float32)}, ["q"], "unknown output 'q'"),
    ]
    for inputs, outputs, problem in cases:
        with pytest.raises(InvalidInputError) as caught:
            signature.check_request(inputs, outputs)
        assert problem in str(caught.value)


# -- engines with an optimization profile (TensorRT): bounds on every dimension ---------------------------------

PROFILED_IN = (TensorSpec("x", F32, (-1, 3, -1), min_shape=(1, 3, 2), max_shape=(8, 3, 6)),)


def test_without_config_a_profiled_model_batches_up_to_the_profile(tmp_path: Path) -> None:
    signature = _reconcile(tmp_path, None, inputs=PROFILED_IN)
    assert signature.max_batch_size == 8  # not the default 16: the plan cannot run more


def test_a_config_asking_more_rows_than_the_profile_is_refused(tmp_path: Path) -> None:
    text = 'max_batch_size: 12\ninput [{ name: "x" data_type: TYPE_FP32 dims: [3, -1] }]'
    with pytest.raises(ModelConfigError, match="optimization profile takes at most 8 rows of input 'x'"):
        _reconcile(tmp_path, text, inputs=PROFILED_IN)


@pytest.mark.parametrize("shape", [(2, 3, 1), (2, 3, 7)])
def test_a_request_outside_the_profile_is_invalid_and_names_the_bounds(tmp_path: Path, shape: tuple[int, ...]) -> None:
    text = 'max_batch_size: 8\ninput [{ name: "x" data_type: TYPE_FP32 dims: [3, -1] }]'
    signature = _reconcile(tmp_path, text, inputs=PROFILED_IN)
    signature.check_request({"x": np.zeros((2, 3, 4), np.float32)})  # inside: fine
    with pytest.raises(InvalidInputError, match=r"input 'x' .* outside the engine's optimization profile"):
        signature.check_request({"x": np.zeros(shape, np.float32)})
