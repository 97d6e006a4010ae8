"""`tensorgate build-engine`, in-process: on the CPU simulator of TensorRT and CUDA, and without TensorRT."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from onnx import TensorProto

from tensorgate.client import cli
from tensorgate.engines.plans import PlanCache
from tensorgate.server.build_engine import main
from tests.support.gpu_simulator import GpuSimulator
from tests.support.models import identity_model

Run = tuple[int, str, str]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return identity_model(tmp_path / "repo" / "m" / "1" / "model.onnx", TensorProto.FLOAT)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Run:
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _engine(sim: GpuSimulator, plan: Path) -> Any:
    trt = sim.tensorrt
    return trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())


def test_builds_beside_the_model_then_comes_from_the_cache(
    gpu_simulator: GpuSimulator, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(model), "--cache-dir", str(tmp_path / "cache"), "--opt-batch", "2", "--max-batch", "4"]
    status, out, err = run(argv, capsys)
    assert (status, err) == (0, "")
    plan = model.with_suffix(".plan")
    assert out.startswith(f"wrote {plan} ")
    assert "built in" in out
    assert "tensorgate simulated GPU (compute capability 8.9)" in out
    assert "batch 1/2/4" in out
    engine = _engine(gpu_simulator, plan)
    assert engine is not None
    assert [tuple(s) for s in engine.get_tensor_profile_shape("x", 0)] == [(1, 2), (2, 2), (4, 2)]
    del engine
    cached = list((tmp_path / "cache").glob("*.plan"))
    assert len(cached) == 1
    assert cached[0].read_bytes() == plan.read_bytes()

    plan.unlink()
    status, out, err = run(argv, capsys)
    assert (status, err) == (0, "")
    assert f"from the plan cache ({cached[0]})" in out
    assert plan.is_file()

    status, out, _ = run([*argv, "--rebuild"], capsys)
    assert status == 0
    assert "built in" in out


def test_output_shapes_workspace_and_timing_cache(
    gpu_simulator: GpuSimulator, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out" / "custom.plan"
    timing = tmp_path / "timing.cache"
    status, out, err = run(
        [
            str(model),
            "-o",
            str(output),
            "--shape",
            "x=1x2:3x2:5x2",
            "--max-batch",
            "5",
            "--workspace",
            "64",
            "--optimization-level",
            "2",
            "--timing-cache",
            str(timing),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capsys,
    )
    assert (status, err) == (0, "")
    assert "x=1x2:3x2:5x2" in out
    engine = _engine(gpu_simulator, output)
    assert [tuple(s) for s in engine.get_tensor_profile_shape("x", 0)] == [(1, 2), (3, 2), (5, 2)]
    del engine
    assert timing.read_bytes()
    assert not list((tmp_path / "cache").glob("timing-*"))  # --timing-cache replaced the cache's own


def test_the_environment_moves_the_cache(
    gpu_simulator: GpuSimulator,
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENSORGATE_PLAN_CACHE", str(tmp_path / "env-cache"))
    status, _, _ = run([str(model), "--max-batch", "2"], capsys)
    assert status == 0
    assert len(list(PlanCache().root.glob("*.plan"))) == 1


def test_the_tensorgate_command_hands_build_engine_to_the_server_side(
    gpu_simulator: GpuSimulator, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["build-engine", str(model), "--max-batch", "2", "--cache-dir", str(tmp_path / "c")])
    out, _ = capsys.readouterr()
    assert status == 0
    assert out.startswith("wrote ")
    assert cli.main(["build-engine", "--help"]) == 0
    assert "--max-batch" in capsys.readouterr().out


def test_a_model_tensorrt_cannot_parse_exits_1(
    gpu_simulator: GpuSimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    status, out, err = run([str(broken), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert status == 1
    assert out == ""
    assert err.startswith(f"error: TensorRT cannot parse {broken}")
    assert not broken.with_suffix(".plan").exists()


def test_missing_dynamic_dimensions_exit_1_naming_the_input(
    gpu_simulator: GpuSimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.unit.test_plans import _sequence_model  # one builder of that model

    model = _sequence_model(tmp_path / "seq.onnx")
    status, _, err = run([str(model), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert status == 1
    assert "input 'x'" in err
    assert "dynamic dimension 1" in err
    assert "--shape" in err


def test_without_tensorrt_exits_2_saying_what_to_install(
    model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    status, out, err = run([str(model)], capsys)
    assert status == 2
    assert out == ""
    assert err.startswith("error: TensorRT is not installed")
    assert "pip install 'tensorgate[tensorrt]'" in err
    assert err.count("\n") == 1  # one line


def test_without_cuda_python_exits_2(
    gpu_simulator: GpuSimulator, model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    status, _, err = run([str(model)], capsys)
    assert status == 2
    assert err.startswith("error: cuda-python is not installed")


def test_without_a_gpu_exits_2(gpu_simulator: GpuSimulator, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gpu_simulator.fail_next("cudaGetDeviceCount", error="cudaErrorNoDevice")
    status, _, err = run([str(model)], capsys)
    assert status == 2
    assert err == (
        "error: no CUDA GPU here (cudaGetDeviceCount: cudaErrorNoDevice); TensorRT plans are built on the GPU\n"
    )
    assert not model.with_suffix(".plan").exists()


def test_a_device_that_is_not_there_exits_2(
    gpu_simulator: GpuSimulator, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run([str(model), "--device", "3"], capsys)
    assert status == 2
    assert err == "error: --device 3: this machine has 1 GPU\n"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--shape", "x=1x2"], "expected NAME=MIN:OPT:MAX"),
        (["--shape", "x=1x2:2x2:4x2", "--shape", "x=1x2:2x2:4x2"], "--shape is given twice for input 'x'"),
        (["--min-batch", "8", "--max-batch", "4"], "1 <= min <= opt <= max"),
        (["--workspace", "0"], "expected a positive integer"),
        (["--device", "-1"], "expected a GPU index"),
        (["--optimization-level", "7"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    model: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], expected: str
) -> None:
    status, out, err = run([str(model), *arguments], capsys)
    assert status == 2
    assert out == ""
    assert expected in err


def test_a_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run([str(tmp_path / "nope.onnx")], capsys)
    assert status == 2
    assert err == f"error: {tmp_path / 'nope.onnx'} is not a file\n"


def test_the_output_cannot_be_the_model(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run([str(model), "--output", str(model)], capsys)
    assert status == 2
    assert "would overwrite the ONNX model" in err
