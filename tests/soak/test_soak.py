"""Soak: steady load from several clients for SOAK_SECONDS; the server's memory stays flat and no call fails.

The server runs as its own process (`tensorgate serve`), so its resident set size (VmRSS in /proc/PID/status) is
its own and not the clients'. Four client threads in this process keep it busy the whole time:

- `echo-v1`: tensorgate.v1 Predict of 4 rows of 16384 FP32 (256 KiB) through an identity model, checked;
- `echo-oip`: Open Inference Protocol ModelInfer of the same, checked;
- `digits-v1`: tensorgate.v1 Predict of 8 digit images (the bundled classifier, dynamic batching, 2 instances);
- `stream`: one tensorgate.v1 stream of digit frames at STREAM_FPS (policy "block": every frame gets a result,
  in order).

The stream is paced like a camera. Unpaced, a "block" stream's sender is not held back at the server's few waiting
frames: gRPC's HTTP/2 flow control, its windows grown by BDP probing, parks thousands of frames in the server's
transport buffers (seconds of backlog), and when the same connection also carries the 256 KiB echo calls those
buffered frames pin hundreds of MiB of the server's memory (a plateau, not a leak: it drains when the load stops).
That is a finding of this soak, reported separately; measuring it here would hide a real leak behind it.

A sampler reads the server's RSS, threads and open files every SAMPLE_INTERVAL seconds. The first WARMUP_SHARE
of the run is warm-up (allocator arenas, gRPC's and ONNX Runtime's buffers reach their steady size). Of the
rest, the median RSS of the last third is compared with the median of the first third.

The bound, RSS_BOUND (24 MiB), is about five times the drift seen between thirds here. A leak of one request's
buffers per call keeps at least 256 KiB per echo call; between the two thirds' midpoints the echo clients make
hundreds of calls at the very least, so such a leak grows RSS by hundreds of MiB. The test checks that this
holds for the run it measured (the echo calls between the midpoints times 256 KiB must be at least four times the
bound) and fails as unable to tell otherwise, instead of passing without the power to catch that leak.

SOAK_SECONDS (environment; default 8) sets the duration; `make soak` runs it for 180 s. With SOAK_REPORT set to a
path, a Markdown report of the samples and call counts is written there (`make soak`: bench/results/soak.md).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from onnx import TensorProto, helper

from tensorgate.client import Client
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.support.serving import copy_models

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "8"))
SOAK_REPORT = os.environ.get("SOAK_REPORT", "")
SAMPLE_INTERVAL = 0.2
WARMUP_SHARE = 0.25
MiB = 1024 * 1024
RSS_BOUND = 24 * MiB
LEAK_MARGIN = 2  # a one-request-per-call leak over the measured span must be this many times the bound
THREAD_SLACK = 8  # threads the server may start after warm-up (gRPC and ONNX Runtime pools grow on demand)
FD_SLACK = 16
CALL_TIMEOUT = 60.0
STREAM_FPS = 200.0

ECHO_WIDTH = 16384
ECHO_ROWS = 4
ECHO_BYTES = ECHO_ROWS * ECHO_WIDTH * 4  # 256 KiB a request, as much again in the response

pytestmark = pytest.mark.timeout(SOAK_SECONDS + 180)


def _echo_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ECHO_WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ECHO_WIDTH])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "echo", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime reads at most IR 13 (FACTS.md)
    return model.SerializeToString()


@dataclass
class Server:
    process: subprocess.Popen[str]
    address: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = copy_models(tmp_path_factory.mktemp("soak"), "digits")
    (repository / "echo" / "1").mkdir(parents=True)
    (repository / "echo" / "1" / "model.onnx").write_bytes(_echo_model())
    program = Path(sys.executable).with_name("tensorgate")
    command = [str(program), "serve", "--address", "127.0.0.1:0", "--repository", str(repository)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # printed once every model is loaded and the port is bound
        found = re.match(r"tensorgate listening on (\S+)", banner)
        assert found, f"unexpected banner {banner!r} (exit code {process.poll()})"
        with Client(found.group(1), timeout=CALL_TIMEOUT) as client:
            assert client.health() == "SERVING"
            assert client.ready("echo")
            assert client.ready("digits")
        yield Server(process, found.group(1))
    finally:
        process.terminate()
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


# -- the load -------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """One client's loop: its call count and the errors it met (the first few, with their count)."""

    name: str
    calls: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)

    def failed(self, error: BaseException) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{type(error).__name__}: {error}")


def _forever(load: Load, stop: threading.Event, call: Callable[[], None]) -> None:
    while not stop.is_set():
        try:
            call()
        except Exception as error:  # every failure is counted and reported; the load goes on
            load.failed(error)
        else:
            load.calls += 1


def _echo_v1(address: str, load: Load, stop: threading.Event) -> None:
    x = np.random.default_rng(1).standard_normal((ECHO_ROWS, ECHO_WIDTH)).astype(np.float32)
    with Client(address, timeout=CALL_TIMEOUT) as client:

        def call() -> None:
            y = client.predict("echo", {"x": x})["y"]
            assert np.array_equal(y, x), "echo-v1: wrong result"

        _forever(load, stop, call)


def _echo_oip(address: str, load: Load, stop: threading.Event) -> None:
    x = np.random.default_rng(2).standard_normal((ECHO_ROWS, ECHO_WIDTH)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MiB)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def call() -> None:
            response = stub.ModelInfer(request, timeout=CALL_TIMEOUT)
            y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(response.outputs[0].shape)
            assert np.array_equal(y, x), "echo-oip: wrong result"

        _forever(load, stop, call)


def _digit_images(count: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).uniform(0, 16, (count, 1, 8, 8)).astype(np.float32)


def _digits_v1(address: str, load: Load, stop: threading.Event) -> None:
    images = _digit_images(8, 3)
    with Client(address, timeout=CALL_TIMEOUT) as client:

        def call() -> None:
            labels = client.predict("digits", {"image": images}, outputs=["label"])["label"]
            assert labels.shape == (8,), "digits-v1: wrong shape"
            assert all(0 <= label <= 9 for label in labels), "digits-v1: bad labels"

        _forever(load, stop, call)


def _stream(address: str, load: Load, stop: threading.Event) -> None:
    images = _digit_images(16, 4)

    def frames() -> Iterator[dict[str, npt.NDArray[Any]]]:
        # Paced like a camera: an unpaced sender under "block" parks thousands of frames in gRPC's buffers
        # (see the module docstring), which measures HTTP/2 flow control rather than the server.
        index = 0
        while not stop.wait(1 / STREAM_FPS):
            yield {"image": images[index % 16 : index % 16 + 1]}
            index += 1

    expected = 0
    try:
        with Client(address) as client:
            for result in client.stream("digits", frames(), outputs=["label"], policy="block"):
                if result.sequence != expected or not result.ok:
                    load.failed(AssertionError(f"frame {result.sequence} (expected {expected}): {result.error}"))
                expected = result.sequence + 1
                load.calls += 1
    except Exception as error:
        load.failed(error)


# -- sampling -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the load started
    rss: int  # bytes
    threads: int
    files: int  # open file descriptors
    echo_calls: int  # echo calls (both APIs) made so far
    calls: int  # calls of every client made so far


def _read_status(pid: int) -> tuple[int, int]:
    rss = threads = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    assert rss >= 0, f"/proc/{pid}/status has no VmRSS"
    assert threads >= 0, f"/proc/{pid}/status has no Threads"
    return rss, threads


def _sampler(pid: int, loads: list[Load], samples: list[Sample], stop: threading.Event, started: float) -> None:
    while True:
        rss, threads = _read_status(pid)
        files = len(os.listdir(f"/proc/{pid}/fd"))
        echo = sum(load.calls for load in loads if load.name.startswith("echo"))
        calls = sum(load.calls for load in loads)
        samples.append(Sample(time.monotonic() - started, rss, threads, files, echo, calls))
        if stop.wait(SAMPLE_INTERVAL):
            return


# -- the report -----------------------------------------------------------------------------------------------


def _write_report(path: Path, samples: list[Sample], loads: list[Load], summary: dict[str, str]) -> None:
    lines = [
        "# Soak",
        "",
        "Written by `make soak` (tests/soak/test_soak.py): steady load from four clients against a `tensorgate serve`",
        "process, sampling its RSS. One machine, one run: the numbers say whether memory stays flat, not how fast.",
        "",
        "| measure | value |",
        "| --- | --- |",
        *(f"| {key} | {value} |" for key, value in summary.items()),
        "",
        "| client | calls | errors |",
        "| --- | ---: | ---: |",
        *(f"| {load.name} | {load.calls} | {load.errors} |" for load in loads),
        "",
        "RSS samples (about 40, evenly spaced):",
        "",
        "| seconds | RSS MiB | threads | open files | calls so far |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    step = max(1, len(samples) // 40)
    for sample in [*samples[::step], samples[-1]] if (len(samples) - 1) % step else samples[::step]:
        lines.append(
            f"| {sample.at:.1f} | {sample.rss / MiB:.1f} | {sample.threads} | {sample.files} | {sample.calls} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -- the test -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_steady_load_keeps_memory_flat_and_every_call_succeeds(server: Server) -> None:
    loads = [Load("echo-v1"), Load("echo-oip"), Load("digits-v1"), Load("stream")]
    bodies = [_echo_v1, _echo_oip, _digits_v1, _stream]
    stop, stop_sampling = threading.Event(), threading.Event()
    samples: list[Sample] = []
    started = time.monotonic()
    sampler = threading.Thread(
        target=_sampler, args=(server.process.pid, loads, samples, stop_sampling, started), daemon=True
    )
    clients = [
        threading.Thread(target=body, args=(server.address, load, stop), name=load.name, daemon=True)
        for body, load in zip(bodies, loads, strict=True)
    ]
    sampler.start()
    for thread in clients:
        thread.start()
    stop.wait(SOAK_SECONDS)  # the soak itself: the clients run meanwhile
    stop.set()
    for thread in clients:
        thread.join(timeout=CALL_TIMEOUT)
    stop_sampling.set()
    sampler.join(timeout=CALL_TIMEOUT)
    assert not any(thread.is_alive() for thread in [*clients, sampler]), "a client did not stop"
    assert server.process.poll() is None, f"the server exited with {server.process.returncode}"

    # Only samples under full load count: after `stop`, the clients wind down and the server frees buffers.
    measured = [sample for sample in samples if SOAK_SECONDS * WARMUP_SHARE <= sample.at <= SOAK_SECONDS]
    third = max(1, len(measured) // 3)
    early, late = measured[:third], measured[-third:]
    early_rss = statistics.median(sample.rss for sample in early)
    late_rss = statistics.median(sample.rss for sample in late)
    growth = late_rss - early_rss
    # What a leak of one request's buffers per echo call would have added between the two thirds' midpoints.
    leak_would_add = (late[len(late) // 2].echo_calls - early[len(early) // 2].echo_calls) * ECHO_BYTES
    summary = {
        "duration": f"{SOAK_SECONDS:g} s (warm-up {SOAK_SECONDS * WARMUP_SHARE:g} s)",
        "calls": f"{sum(load.calls for load in loads)} ({sum(load.errors for load in loads)} errors)",
        "calls per second": f"{sum(load.calls for load in loads) / SOAK_SECONDS:.0f}",
        "RSS first / last sample": f"{samples[0].rss / MiB:.1f} / {samples[-1].rss / MiB:.1f} MiB",
        "RSS median, first third after warm-up": f"{early_rss / MiB:.1f} MiB",
        "RSS median, last third": f"{late_rss / MiB:.1f} MiB",
        "growth (bound)": f"{growth / MiB:+.1f} MiB ({RSS_BOUND / MiB:.0f} MiB)",
        "a 256 KiB-per-echo-call leak would have added": f"{leak_would_add / MiB:.0f} MiB",
        "threads early max / late max": f"{max(s.threads for s in early)} / {max(s.threads for s in late)}",
        "open files early max / late max": f"{max(s.files for s in early)} / {max(s.files for s in late)}",
    }
    if SOAK_REPORT:
        _write_report(Path(SOAK_REPORT), samples, loads, summary)

    for load in loads:
        assert load.errors == 0, f"{load.name}: {load.errors} errors, the first: {load.first_errors}"
        assert load.calls > 0, f"{load.name} made no call"
    assert len(measured) >= 6, f"only {len(measured)} samples after warm-up: SOAK_SECONDS={SOAK_SECONDS} is too short"
    assert leak_would_add >= LEAK_MARGIN * RSS_BOUND, (
        f"too few echo calls to tell a leak from noise: a 256 KiB-per-call leak would add only "
        f"{leak_would_add / MiB:.0f} MiB, under {LEAK_MARGIN} x the {RSS_BOUND / MiB:.0f} MiB bound"
    )
    assert growth < RSS_BOUND, f"server RSS grew {growth / MiB:.1f} MiB under steady load: {summary}"
    assert max(s.threads for s in late) <= max(s.threads for s in early) + THREAD_SLACK, summary
    assert max(s.files for s in late) <= max(s.files for s in early) + FD_SLACK, summary
