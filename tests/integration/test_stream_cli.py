"""`tensorgate stream` against the real server: synthetic frames, a video file, and its errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from tensorgate.client.cli import main
from tests.support.serving import ServerThread


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def summary(out: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def test_synthetic_frames(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stream", "--address", served.address, "--model", "digits", "--size", "32x24", "--frames", "20"]
    status, out, err = run([*argv, "--fps", "60", "--json", "--quiet"], capsys)

    assert (status, err) == (0, "")
    result = summary(out)
    assert result["sent"] == 20
    assert result["results"] + result["dropped"] == 20
    assert result["errors"] == 0
    assert result["ok"] == result["results"] > 0
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"] <= result["latency_ms"]["max"]
    assert result["server_ms"]["infer"] > 0


def test_png_frames_and_the_text_summary(served: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stream", "--address", served.address, "--model", "digits", "--size", "16x16", "--encoding", "png"]
    status, out, _ = run([*argv, "--frames", "5", "--fps", "0", "--policy", "block", "--image-scale", "0.0627"], capsys)

    assert status == 0
    assert "frames    sent 5" in out
    assert "results 5" in out
    assert "5 ok, 0 errors" in out
    assert "latency   capture to result: p50" in out


def test_a_video_file(served: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30, (64, 48))
    for index in range(12):
        writer.write(np.full((48, 64, 3), index * 20, np.uint8))
    writer.release()

    argv = ["stream", "--address", served.address, "--model", "digits", "--source", str(path)]
    status, out, err = run([*argv, "--fps", "0", "--policy", "block", "--json"], capsys)

    assert (status, err) == (0, "")
    result = summary(out)
    assert (result["sent"], result["results"], result["ok"], result["dropped"]) == (12, 12, 12, 0)
    assert result["server_ms"]["decode"] > 0  # JPEG frames decoded and resized on the server


def test_errors(served: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["stream", "--address", served.address, "--frames", "3", "--size", "8x8"]

    status, _, err = run([*base, "--model", "digits", "--source", str(tmp_path / "missing.avi")], capsys)
    assert status == 2
    assert "cannot open" in err

    status, _, err = run([*base, "--model", "no_such_model"], capsys)
    assert status == 1
    assert "NOT_FOUND" in err

    status, _, err = run([*base, "--model", "digits", "--image-size", "9x9"], capsys)
    assert status == 1
    assert "INVALID_ARGUMENT" in err
    assert "width 8, not 9" in err

    status, _, err = run([*base, "--model", "digits", "--image-dtype", "FP99"], capsys)
    assert status == 2
    assert "FP99" in err

    status, out, _ = run([*base, "--model", "add_sub", "--json"], capsys)  # frames fail, the stream goes on
    assert status == 0
    result = summary(out)
    assert result["errors"] == result["results"] > 0
    assert "several inputs" in result["first_errors"][0]
