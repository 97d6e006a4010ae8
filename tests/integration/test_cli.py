"""The `tensorgate` command against the real server: main([...]) in process, and the installed script once."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client.cli import main
from tests.support.serving import ServerThread


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_models(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(["models", "--address", served.address], capsys)

    assert (status, err) == (0, "")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["MODEL", "VERSION", "STATE", "PLATFORM", "REASON"]
    assert ["add_sub", "1", "READY", "onnxruntime_onnx"] in rows
    assert ["digits", "1", "READY", "onnxruntime_onnx"] in rows


def test_metadata(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["metadata", "digits", "--address", served.address], capsys)

    assert status == 0
    assert "max batch size: 64" in out
    assert "image  FP32  [-1, 1, 8, 8]" in out
    assert "label          INT64  [-1]" in out


def test_address_from_the_environment(
    served: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORGATE_ADDRESS", served.address)

    status, out, _ = run(["health"], capsys)

    assert (status, out) == (0, "SERVING\n")


def test_health(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["health", "digits", "--address", served.address], capsys)[:2] == (0, "SERVING\n")

    status, out, err = run(["health", "no_such_service", "--address", served.address], capsys)
    assert (status, out) == (1, "")
    assert err.startswith("error: NOT_FOUND: ")


def test_predict_json_plain_lists_take_the_model_dtype(
    served: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    document = {"a": [[1, 2, 3, 4]], "b": [[4, 3, 2, 1]]}  # ints in JSON; the model wants FP32
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(document)))

    status, out, err = run(["predict", "add_sub", "--json", "-", "--address", served.address], capsys)

    assert (status, err) == (0, "")
    assert "sum: FP32 [1, 4]\n  [[5., 5., 5., 5.]]" in out
    assert "difference: FP32 [1, 4]\n  [[-3., -1.,  1.,  3.]]" in out


def test_predict_npy_and_save(served: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    image = np.random.default_rng(1).uniform(0, 16, (5, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)

    status, out, _ = run(
        [
            "predict",
            "digits",
            "--input",
            f"image={tmp_path / 'image.npy'}",
            "--version",
            "1",
            "--save",
            str(tmp_path / "out"),
            "--address",
            served.address,
        ],
        capsys,
    )

    assert status == 0
    assert "label: INT64 [5] ->" in out
    assert np.load(tmp_path / "out" / "probabilities.npy").shape == (5, 10)
    assert np.load(tmp_path / "out" / "label.npy").dtype == np.int64


def test_predict_server_errors_exit_1(served: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 4), np.float64))  # FP64 where the model wants FP32
    np.save(tmp_path / "b.npy", np.zeros((1, 4), np.float32))
    inputs = ["-i", f"a={tmp_path / 'a.npy'}", "-i", f"b={tmp_path / 'b.npy'}", "--address", served.address]

    status, out, err = run(["predict", "add_sub", *inputs], capsys)
    assert (status, out) == (1, "")
    assert err.startswith("error: INVALID_ARGUMENT: ")

    status, _, err = run(["predict", "no_such_model", *inputs], capsys)
    assert status == 1
    assert err.startswith("error: NOT_FOUND: ")


def test_predict_json_input_the_model_lacks_exits_2(
    served: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "in.json").write_text('{"c": [[1, 2, 3, 4]]}')

    status, _, err = run(
        ["predict", "add_sub", "--json", str(tmp_path / "in.json"), "--address", served.address], capsys
    )

    assert status == 2
    assert "no input 'c' (its inputs: a, b)" in err


def test_console_script(served: ServerThread) -> None:
    script = shutil.which("tensorgate", path=str(Path(sys.executable).parent)) or shutil.which("tensorgate")
    if script is None:
        pytest.skip("the tensorgate console script is not installed")
    environment = {**os.environ, "TENSORGATE_ADDRESS": served.address}

    done = subprocess.run(
        [script, "predict", "add_sub", "--json", "-"],
        input='{"a": [[1, 1, 1, 1]], "b": {"dtype": "FP32", "data": [2, 2, 2, 2], "shape": [1, 4]}}',
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "sum: FP32 [1, 4]\n  [[3., 3., 3., 3.]]" in done.stdout
