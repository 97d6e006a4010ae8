"""tensorgate.v1.Stream over the wire: order, drop policies, image frames, per-frame errors, the stream limit."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from tensorgate.client import Client, Preprocessing, ResourceExhaustedError
from tensorgate.client import Image as FrameImage
from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import stream_pb2, stream_pb2_grpc, tensor_pb2
from tests.support.serving import EXAMPLE_MODELS, copy_models, running_server
from tests.support.telemetry import Samples, scrape, telemetry_server, wait_for

BLOCK = stream_pb2.DROP_POLICY_BLOCK


def _config(model: str = "add_sub", **fields: Any) -> stream_pb2.StreamRequest:
    fields.setdefault("drop_policy", BLOCK)  # every frame gets its result unless a test says otherwise
    return stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model=model, outputs=["sum"], **fields))


def _frame(sequence: int, *, rows: int = 1) -> stream_pb2.StreamRequest:
    a = np.full((rows, 4), sequence, np.float32)
    tensors = [to_tensor("a", a), to_tensor("b", a)]
    return stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=sequence, inputs=tensors))


def _image_frame(sequence: int, image: stream_pb2.Image) -> stream_pb2.StreamRequest:
    return stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=sequence, image=image, capture_time_ns=77))


def _run(channel: grpc.Channel, requests: Iterator[stream_pb2.StreamRequest]) -> list[stream_pb2.StreamResponse]:
    return list(stream_pb2_grpc.StreamStub(channel).Stream(requests, timeout=30))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_results_come_back_in_frame_order(channel: grpc.Channel) -> None:
    sequences = [5, 3, 9, *range(10, 60)]
    results = _run(channel, iter([_config(), *(_frame(s, rows=1 + s % 3) for s in sequences)]))
    assert [r.sequence for r in results] == sequences
    for result, sequence in zip(results, sequences, strict=True):
        (output,) = result.outputs
        assert output.name == "sum"
        np.testing.assert_array_equal(from_tensor(output), np.full((1 + sequence % 3, 4), 2 * sequence))
        assert result.dropped == 0


def test_by_default_stale_frames_are_dropped_and_counted(channel: grpc.Channel) -> None:
    # A burst: the server reads every frame at once and keeps only the newest waiting one (DROP_POLICY_LATEST).
    count = 200
    config = stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="add_sub"))
    results = _run(channel, iter([config, *(_frame(s, rows=64) for s in range(count))]))

    sequences = [r.sequence for r in results]
    assert sequences == sorted(sequences)
    assert sequences[-1] == count - 1
    assert sum(r.dropped for r in results) > 0
    assert len(results) + sum(r.dropped for r in results) == count  # every frame answered or counted


def test_results_carry_capture_time_and_stage_timings(channel: grpc.Channel) -> None:
    frame = _frame(1)
    frame.frame.capture_time_ns = 1_700_000_000_123_456_789
    (result,) = _run(channel, iter([_config(), frame]))

    assert result.capture_time_ns == 1_700_000_000_123_456_789
    timings = result.timings
    assert timings.infer_ns > 0
    assert timings.queue_ns > 0
    assert timings.decode_ns > 0
    assert timings.server_ns >= timings.decode_ns + timings.infer_ns


def test_bad_frame_gets_an_error_result_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    bad = stream_pb2.StreamRequest(
        frame=stream_pb2.Frame(
            sequence=2,
            inputs=[tensor_pb2.Tensor(name="a", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[1, 4], raw=b"x")],
        )
    )
    results = _run(channel, iter([_config(), _frame(1), bad, _config(), stream_pb2.StreamRequest(), _frame(4)]))
    assert [r.sequence for r in results] == [1, 2, 0, 0, 4]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "'a'" in results[1].error.message
    assert "only the first message" in results[2].error.message
    assert "neither" in results[3].error.message
    assert len(results[4].outputs) == 1
    assert not results[4].HasField("error")


def test_image_frames_through_the_digits_model(channel: grpc.Channel) -> None:
    values = (np.arange(64).reshape(8, 8) % 17).astype(np.uint8)
    png = stream_pb2.Image(data=_png(values * 15))
    raw = stream_pb2.Image(format=stream_pb2.IMAGE_FORMAT_GRAY, data=(values * 15).tobytes(), width=8, height=8)
    large = stream_pb2.Image(format=stream_pb2.IMAGE_FORMAT_RGB, data=bytes(64 * 48 * 3), width=64, height=48)
    config = stream_pb2.StreamRequest(
        config=stream_pb2.StreamConfig(
            model="digits", drop_policy=BLOCK, preprocessing=stream_pb2.Preprocessing(std=[15.0])
        )
    )
    bad = [
        stream_pb2.Image(data=b"\x89PNG\r\n\x1a\n broken"),
        stream_pb2.Image(format=stream_pb2.IMAGE_FORMAT_GRAY, data=bytes(10), width=8, height=8),
        stream_pb2.Image(format=stream_pb2.IMAGE_FORMAT_JPEG, data=_png(values)),
    ]
    frames = [png, bad[0], raw, bad[1], large, bad[2], png]

    results = _run(channel, iter([config, *(_image_frame(i, image) for i, image in enumerate(frames))]))

    assert [r.sequence for r in results] == list(range(len(frames)))
    assert [r.HasField("error") for r in results] == [False, True, False, True, False, True, False]
    assert "PNG image cannot be decoded" in results[1].error.message
    assert "has 10 bytes; 8x8 needs 64" in results[3].error.message
    assert "should be JPEG but is PNG" in results[5].error.message
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in results if r.HasField("error"))
    labels = [int(from_tensor(next(o for o in r.outputs if o.name == "label"))[0]) for r in results[0:3:2]]
    assert labels[0] == labels[1]  # the same pixels as PNG and as raw gray give the same answer
    assert results[0].capture_time_ns == 77


def test_image_frames_for_a_model_without_an_image_input_fail_alone(channel: grpc.Channel) -> None:
    image = stream_pb2.Image(format=stream_pb2.IMAGE_FORMAT_GRAY, data=bytes(4), width=2, height=2)
    results = _run(channel, iter([_config(), _frame(1), _image_frame(2, image), _frame(3)]))

    assert [(r.sequence, r.HasField("error")) for r in results] == [(1, False), (2, True), (3, False)]
    assert "several inputs" in results[1].error.message


def test_preprocessing_that_cannot_work_fails_the_stream(channel: grpc.Channel) -> None:
    config = stream_pb2.StreamRequest(
        config=stream_pb2.StreamConfig(model="digits", preprocessing=stream_pb2.Preprocessing(width=9))
    )
    with pytest.raises(grpc.RpcError) as caught:
        _run(channel, iter([config]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "width 8, not 9" in (caught.value.details() or "")


def test_preprocessing_from_the_models_config(tmp_path: Path) -> None:
    repository = copy_models(tmp_path / "models", "digits")
    config_file = repository / "digits" / "config.pbtxt"
    config_file.write_text(config_file.read_text() + 'parameters { key: "image_std" value { string_value: "15" } }\n')
    values = (np.arange(64).reshape(8, 8) % 17).astype(np.uint8)
    with running_server(repository) as server, Client(server.address) as client:
        image = FrameImage(_png(values * 15))
        from_config = next(client.stream("digits", [image], outputs=["probabilities"]))
        explicit = next(
            client.stream("digits", [image], outputs=["probabilities"], preprocessing=Preprocessing(std=[15.0]))
        )
        unscaled = next(
            client.stream("digits", [image], outputs=["probabilities"], preprocessing=Preprocessing(std=[1.0]))
        )
        tensor = next(client.stream("digits", [{"image": values[None, None].astype(np.float32)}]))
    np.testing.assert_array_equal(from_config.outputs["probabilities"], explicit.outputs["probabilities"])
    np.testing.assert_array_equal(from_config.outputs["probabilities"], tensor.outputs["probabilities"])
    assert not np.array_equal(from_config.outputs["probabilities"], unscaled.outputs["probabilities"])


def test_first_message_must_be_config(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _run(channel, iter([_frame(1)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in (caught.value.details() or "")


def test_unknown_model_fails_the_stream(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _run(channel, iter([_config("nope"), _frame(1)]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"queue_size": 100_000}, "queue_size"),
        ({"max_in_flight": 100_000}, "max_in_flight"),
        ({"drop_policy": 99}, "drop_policy"),
    ],
)
def test_bad_stream_settings_fail_the_stream(channel: grpc.Channel, fields: dict[str, int], message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _run(channel, iter([_config("add_sub", **fields), _frame(1)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")


def test_empty_stream_ends_cleanly(channel: grpc.Channel) -> None:
    assert _run(channel, iter([])) == []
    assert _run(channel, iter([_config()])) == []


def test_streams_past_the_limit_are_refused_until_one_ends() -> None:
    with running_server(EXAMPLE_MODELS, max_streams=2) as server, Client(server.address) as client:
        gates = [threading.Event(), threading.Event()]

        def held(gate: threading.Event) -> Iterator[dict[str, np.ndarray]]:
            yield {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}
            gate.wait(30)

        open_streams = [client.stream("add_sub", held(gate)) for gate in gates]
        for stream in open_streams:
            assert next(stream).ok  # both streams hold a place now

        with pytest.raises(ResourceExhaustedError, match="max_streams=2"):
            next(client.stream("add_sub", held(threading.Event())))
        assert server.server.streams.refused == 1

        gates[0].set()  # the first stream's source ends; its stream ends, and frees its place
        assert list(open_streams[0]) == []
        assert next(client.stream("add_sub", [{"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}]))
        gates[1].set()
        assert list(open_streams[1]) == []
        assert len(server.server.streams) == 0


def test_dropped_frames_are_counted_in_the_metrics(tmp_path: Path) -> None:
    repository = copy_models(tmp_path / "models", "add_sub")
    config = stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="add_sub"))  # latest: drops a burst
    key = ("tensorgate_stream_frames_dropped_total", (("model", "add_sub"),))
    with (
        telemetry_server(repository, metrics_address="127.0.0.1:0") as (server, _),
        grpc.insecure_channel(server.address) as channel,
    ):
        results = _run(channel, iter([config, *(_frame(s, rows=64) for s in range(200))]))
        dropped = sum(r.dropped for r in results)
        address = server.server.telemetry.metrics_address

        def counted() -> Samples | None:
            samples = scrape(address)
            return samples if samples.get(key) == dropped else None

        wait_for(counted, what="the dropped frames in the metrics")
    assert dropped > 0
