"""Camera streams under load: eight 30 fps cameras against a model slower than their total frame rate, a client
that stops reading its results, and clients killed mid-stream.

What is asserted is structure, not speed: every stream's results are in order; every frame is answered or
counted as dropped; the server never holds more of a stream than its drop policy allows (so its memory and the
results' staleness cannot grow with time); frames of different streams share batches; the server goes on serving.
The one timing check (the latency of the last results against the first ones) has a wide margin: with frames
queued instead of dropped it fails by seconds.
"""

from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from tensorgate.client import Client, Frame, Image, StreamResult
from tensorgate.client.stream_tool import paced
from tensorgate.client.tensors import to_tensor
from tensorgate.engines import register_engine
from tensorgate.engines.onnxruntime import OnnxRuntimeEngine
from tensorgate.server.streams import StreamStats
from tensorgate.v1 import stream_pb2, stream_pb2_grpc
from tests.support.serving import EXAMPLE_MODELS, ServerThread, running_server

T = TypeVar("T")

# The slow model: 10 ms a batch plus 8 ms a row, so it serves under 125 frames/s whatever the batch size,
# against the cameras' 240.
BATCH_SECONDS = 0.01
ROW_SECONDS = 0.008
CAMERAS = 8
FPS = 30.0
FRAMES = 90  # 3 seconds of video per camera
ECHO_WIDTH = 65536  # the echo model's rows: 256 KiB of float32 each way


class SlowEngine(OnnxRuntimeEngine):
    """ONNX Runtime, plus a sleep per batch and per row on the instance's thread; records each batch's rows."""

    batch_rows: ClassVar[list[int]] = []

    def _run(self, instance: int, inputs: Any, outputs: Any) -> dict[str, npt.NDArray[Any]]:
        rows = len(next(iter(inputs.values())))
        time.sleep(BATCH_SECONDS + ROW_SECONDS * rows)
        SlowEngine.batch_rows.append(rows)
        return super()._run(instance, inputs, outputs)


register_engine(
    "slow_onnx_test", backend="slow_onnx_test", target=f"{__name__}:SlowEngine", default_filename="model.onnx"
)

SLOW_CONFIG = """
name: "slow_digits"
platform: "slow_onnx_test"
max_batch_size: 64
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "image_std" value { string_value: "15" } }
"""


def _echo_model() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ECHO_WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", ECHO_WIDTH])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "echo", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # onnxruntime reads at most IR 13 (FACTS.md)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server with `slow_digits` (the digits classifier, slowed down) and `echo` (big results)."""
    repository = tmp_path_factory.mktemp("stream-load")
    slow = repository / "slow_digits"
    (slow / "1").mkdir(parents=True)
    shutil.copy(EXAMPLE_MODELS / "digits" / "1" / "model.onnx", slow / "1" / "model.onnx")
    (slow / "config.pbtxt").write_text(SLOW_CONFIG)
    (repository / "echo" / "1").mkdir(parents=True)
    (repository / "echo" / "1" / "model.onnx").write_bytes(_echo_model())
    onnx.checker.check_model(str(repository / "echo" / "1" / "model.onnx"))
    with running_server(repository) as thread:
        yield thread


def _stats(server: ServerThread) -> list[StreamStats]:
    async def read() -> list[StreamStats]:
        return server.server.streams.active()

    result: list[StreamStats] = server.call(read())
    return result


def _wait_for(condition: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll `condition` until it returns something truthy (the server works on its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _digit_image(value: int) -> Image:
    pixels = np.full((8, 8), value % 17 * 15, np.uint8)
    return Image.from_array(pixels, "gray")


BROKEN = Image(b"\x89PNG\r\n\x1a\n not really", "png")


def test_eight_cameras_against_a_slower_model(server: ServerThread) -> None:
    SlowEngine.batch_rows.clear()
    results: list[list[StreamResult]] = [[] for _ in range(CAMERAS)]
    sent = [0] * CAMERAS
    bad = {sequence for sequence in range(FRAMES) if sequence % 10 == 5}  # camera 0 sends a broken image now and then

    def camera(index: int) -> None:
        def counted() -> None:
            sent[index] += 1

        images = (BROKEN if index == 0 and i in bad else _digit_image(i) for i in range(FRAMES))
        frames: Iterator[Frame] = paced(images, FPS, on_sent=counted)
        with Client(server.address) as client:
            results[index].extend(client.stream("slow_digits", frames, outputs=["label"]))

    threads = [threading.Thread(target=camera, args=(index,)) for index in range(CAMERAS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    for index, stream in enumerate(results):
        sequences = [result.sequence for result in stream]
        assert sent[index] == FRAMES
        assert sequences == sorted(set(sequences)), f"camera {index}: results out of order"
        assert sequences[-1] == FRAMES - 1  # the newest frame is never dropped
        assert len(stream) + sum(result.dropped for result in stream) == FRAMES, f"camera {index}: frames lost"
        for result in stream:
            broken = index == 0 and result.sequence in bad
            assert result.ok != broken, f"camera {index} frame {result.sequence}: {result.error}"
            if result.ok:
                assert int(result.outputs["label"][0]) >= 0
    dropped = sum(result.dropped for stream in results for result in stream)
    assert dropped > 0, "the model serves under 125 frames/s, the cameras send 240: frames must be dropped"

    # What the server held: never more than the policy allows (latest: one waiting frame, one in flight).
    finished = list(server.server.streams.recent)[-CAMERAS:]
    assert sorted(stats.received for stats in finished) == [FRAMES] * CAMERAS
    assert sum(stats.dropped for stats in finished) == dropped
    assert max(stats.peak_in_flight for stats in finished) == 1
    assert max(stats.peak_buffered for stats in finished) == 1
    # Each stream had one frame in flight at most, so a batch of several rows held frames of several streams.
    assert max(SlowEngine.batch_rows) > 1

    # Latency stays bounded: the last results are about as fresh as the first ones (were frames queued instead,
    # the backlog would grow by over 100 frames a second and the last results would come seconds late).
    for index, stream in enumerate(results):
        latencies = [result.latency for result in stream if result.latency is not None]
        third = len(latencies) // 3
        early, late = statistics.median(latencies[:third]), statistics.median(latencies[-third:])
        assert late <= 2 * early + 0.25, f"camera {index}: latency grew from {early:.3f} s to {late:.3f} s"


def test_a_client_that_stops_reading_does_not_grow_the_server(server: ServerThread) -> None:
    count = 400
    row = np.arange(ECHO_WIDTH, dtype=np.float32)[None]
    config = stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="echo"))

    def requests() -> Iterator[stream_pb2.StreamRequest]:
        yield config
        for sequence in range(count):
            frame = stream_pb2.Frame(sequence=sequence, inputs=[to_tensor("x", row + sequence)])
            yield stream_pb2.StreamRequest(frame=frame)

    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 1 << 26)]) as channel:
        responses = iter(stream_pb2_grpc.StreamStub(channel).Stream(requests(), timeout=60))
        first = next(responses)
        # Read nothing more: ~100 MB of frames keep coming, and ~100 MB of results could pile up.
        stats = _wait_for(
            lambda: next((s for s in _stats(server) if s.model == "echo" and s.received == count), None),
            "the server to read every frame",
        )
        assert stats is not None
        assert stats.buffered <= 1
        assert stats.in_flight <= 1
        assert stats.peak_buffered == 1
        assert stats.peak_in_flight == 1
        # Results handed to gRPC stop at what HTTP/2 flow control lets through (a few MB); the rest was dropped.
        assert stats.results < count // 2
        assert stats.dropped >= count - stats.results - 2

        rest = list(responses)  # now read: the stream finishes normally
    answered = [first, *rest]
    assert [r.sequence for r in answered] == sorted(r.sequence for r in answered)
    assert len(answered) + sum(r.dropped for r in answered) == count
    assert all(not r.HasField("error") for r in answered)
    _wait_for(lambda: not [s for s in _stats(server) if s.model == "echo"], "the stream to close")


CHILD = """
import sys, time
import numpy as np
from tensorgate.client import Client, Image

address, read_all = sys.argv[1], sys.argv[2] == "read"
def frames():
    i = 0
    while True:
        yield Image.from_array(np.full((8, 8), i % 200, np.uint8), "gray")
        i += 1
        time.sleep(0.002)
with Client(address) as client:
    for result in client.stream("slow_digits", frames(), policy="queue", queue_size=4):
        print("streaming", flush=True)
        if not read_all:
            time.sleep(3600)  # stop reading, keep sending
"""


def test_killed_clients_leave_the_server_serving(server: ServerThread) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, server.address, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("read", "stall")
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "streaming", child.stderr.read() if child.stderr else ""
        _wait_for(lambda: len([s for s in _stats(server) if s.model == "slow_digits"]) == 2, "both streams")
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)  # no goodbye: the connection just dies
            child.communicate(timeout=30)  # reaps it and closes its pipes

    _wait_for(lambda: len(server.server.streams) == 0, "the server to notice and close both streams")
    with Client(server.address) as client:
        assert client.health() == "SERVING"
        frames = [_digit_image(3), BROKEN, _digit_image(4)]
        results = list(client.stream("slow_digits", frames, policy="block"))
    assert [(result.sequence, result.ok) for result in results] == [(0, True), (1, False), (2, True)]
