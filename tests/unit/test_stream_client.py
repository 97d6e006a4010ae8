"""The client's stream helpers without a server: frame and config messages, pacing, and the live statistics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tensorgate.client import Frame, FrameTimings, Image, Preprocessing, StreamResult
from tensorgate.client._common import FrameError, build_stream_config, parse_stream_response
from tensorgate.client.cli import build_parser
from tensorgate.client.frames import build_frame
from tensorgate.client.stream_tool import LiveStats, paced, synthetic_images
from tensorgate.v1 import stream_pb2, tensor_pb2


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 9))
        self.now += seconds


def test_image_from_array_checks_the_pixels() -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    image = Image.from_array(rgb, "bgr")
    assert (image.format, image.width, image.height, len(image.data)) == ("bgr", 6, 4, 72)
    assert Image.from_array(np.zeros((4, 6, 1), np.uint8), "gray").width == 6
    with pytest.raises(ValueError, match="uint8"):
        Image.from_array(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="height x width x 3"):
        Image.from_array(np.zeros((4, 6), np.uint8), "rgb")
    with pytest.raises(ValueError, match="raw formats"):
        Image.from_array(rgb, "jpeg")
    with pytest.raises(ValueError, match="not one of"):
        Image(b"", "gif")
    with pytest.raises(ValueError, match="width and height"):
        Image(b"\x00" * 3, "rgb")


def test_frames_become_messages_with_a_capture_time() -> None:
    tensors = build_frame({"x": np.ones((1, 2), np.float32)}, 4)
    assert tensors.sequence == 4
    assert [t.name for t in tensors.inputs] == ["x"]
    assert tensors.capture_time_ns > 0
    assert not tensors.HasField("image")

    image = build_frame(Image(b"\xff\xd8\xff...", "jpeg"), 5)
    assert image.image.format == stream_pb2.IMAGE_FORMAT_JPEG
    assert image.image.data == b"\xff\xd8\xff..."

    both = build_frame(Frame({"extra": [1]}, Image(b"\x01", "gray", 1, 1), capture_time_ns=42), 6)
    assert both.capture_time_ns == 42
    assert (both.image.format, both.image.width, both.image.height) == (stream_pb2.IMAGE_FORMAT_GRAY, 1, 1)
    assert [t.name for t in both.inputs] == ["extra"]


def test_stream_config_carries_the_policy_and_preprocessing() -> None:
    preprocessing = Preprocessing(
        input="pixels", color="bgr", width=32, height=24, layout="nhwc", dtype="fp16", scale=0.5, mean=[1], std=[2]
    )
    request = build_stream_config("m", policy="queue", queue_size=3, max_in_flight=2, preprocessing=preprocessing)
    config = request.config
    assert (config.drop_policy, config.queue_size, config.max_in_flight) == (stream_pb2.DROP_POLICY_QUEUE, 3, 2)
    message = config.preprocessing
    assert (message.input, message.width, message.height, message.scale) == ("pixels", 32, 24, 0.5)
    assert (message.color, message.layout) == (stream_pb2.COLOR_ORDER_BGR, stream_pb2.LAYOUT_NHWC)
    assert message.dtype == tensor_pb2.DATA_TYPE_FP16
    assert (list(message.mean), list(message.std)) == ([1.0], [2.0])
    plain = build_stream_config("m").config
    assert plain.drop_policy == stream_pb2.DROP_POLICY_UNSPECIFIED
    assert not plain.HasField("preprocessing")
    assert not Preprocessing().to_message().HasField("scale")
    with pytest.raises(ValueError, match="policy 'drop-everything'"):
        build_stream_config("m", policy="drop-everything")
    with pytest.raises(ValueError, match="color"):
        Preprocessing(color="CMYK").to_message()
    with pytest.raises(ValueError, match=">= 0"):
        build_stream_config("m", queue_size=-1)


def test_a_response_becomes_a_result_with_latency_timings_and_drops() -> None:
    response = stream_pb2.StreamResponse(
        sequence=9,
        capture_time_ns=1,
        dropped=3,
        timings=stream_pb2.FrameTimings(decode_ns=1_000_000, queue_ns=2_000_000, infer_ns=3_000_000, server_ns=7),
        error=stream_pb2.FrameError(code=3, message="bad image"),
    )
    result = parse_stream_response(response)
    assert (result.sequence, result.dropped, result.ok) == (9, 3, False)
    assert result.error == FrameError("INVALID_ARGUMENT", "bad image")
    assert result.timings == FrameTimings(0.001, 0.002, 0.003, 7e-9)
    assert result.latency is not None
    assert result.latency > 0
    assert StreamResult(sequence=0).latency is None


def test_paced_keeps_the_rate_and_does_not_catch_up_in_a_burst() -> None:
    fake = FakeTime()
    times = []

    def sent() -> None:
        times.append(round(fake.now - 100.0, 6))

    frames = paced(synthetic_images(4, 3, distinct=2), 10.0, frames=5, clock=fake.clock, sleep=fake.sleep, on_sent=sent)
    first = next(frames)
    fake.now += 0.35  # the consumer stalls for 3.5 frame intervals
    rest = list(frames)

    assert len(rest) == 4
    assert first.image is not None
    assert first.capture_time_ns is not None
    # After the stall the next frame goes at once, then the pace resumes from there: no burst of the missed ones.
    assert times == pytest.approx([0.0, 0.35, 0.45, 0.55, 0.65])
    assert fake.slept == pytest.approx([0.1, 0.1, 0.1])


def test_paced_stops_after_a_duration() -> None:
    fake = FakeTime()
    frames = list(paced(synthetic_images(2, 2), 30.0, duration=1.0, clock=fake.clock, sleep=fake.sleep))
    assert len(frames) == 30


def test_synthetic_images_move() -> None:
    images = list(itertools.islice(synthetic_images(40, 30, distinct=4), 5))
    assert images[0].data == images[4].data
    assert images[0].data != images[1].data
    assert (images[0].format, images[0].width, images[0].height) == ("bgr", 40, 30)


def test_live_stats_rates_percentiles_and_summary() -> None:
    fake = FakeTime()
    stats = LiveStats(window=2.0, clock=fake.clock)
    for index in range(100):
        fake.now += 0.01
        stats.frame_sent()
        latency_ns = (index + 1) * 1_000_000  # 1..100 ms
        timings = FrameTimings(0.001, 0.002, 0.003, 0.006)
        if index % 10 == 9:
            result = StreamResult(index, error=FrameError("INVALID_ARGUMENT", "bad"), dropped=1)
        else:
            result = StreamResult(index, capture_time_ns=10**12, received_time_ns=10**12 + latency_ns, timings=timings)
        stats.result(result)

    summary = stats.summary("m", "synthetic", "latest")
    assert (summary.sent, summary.results, summary.errors, summary.ok, summary.dropped) == (100, 100, 10, 90, 10)
    assert summary.latency_ms["max"] == pytest.approx(99.0)
    assert 40 < summary.latency_ms["p50"] < 60
    assert summary.server_ms["infer"] == pytest.approx(3.0)
    assert summary.input_fps == pytest.approx(100.0)
    assert len(summary.first_errors) == 3
    assert "dropped by the server 10 (10.0%)" in summary.text()
    assert "in 100.0 fps" in stats.status()
    empty = LiveStats(clock=fake.clock).summary("m", "s", "latest")
    assert math.isnan(empty.latency_ms["p99"])


def test_the_stream_command_parses() -> None:
    args = build_parser().parse_args(
        ["stream", "--model", "m", "--size", "32x24", "--image-mean", "1,2,3", "--policy", "block", "--fps", "0"]
    )
    assert (args.size, args.image_mean, args.policy, args.fps, args.source) == (
        (32, 24),
        (1.0, 2.0, 3.0),
        "block",
        0.0,
        "synthetic",
    )
    for bad in (["--size", "32"], ["--fps", "-1"], ["--frames", "0"], ["--policy", "never"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["stream", "--model", "m", *bad])
