"""Prometheus metrics scraped from the real endpoint after real traffic: counters, histograms and gauges move as
they must, and a rejected request counts once, under its code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import numpy as np
import pytest

from tensorgate.client import Client, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from tensorgate.client.tensors import to_tensor
from tensorgate.server.telemetry.metrics import nvml_collector
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc
from tests.support.serving import ServerThread, copy_models
from tests.support.telemetry import Samples, scrape, telemetry_server, wait_for

PREDICT = "tensorgate.v1.Predict/Predict"
STREAM = "tensorgate.v1.Stream/Stream"

#: A copy of digits with room for one queued request, which waits up to 30 s for company: a second request is
#: refused with RESOURCE_EXHAUSTED while the first one waits.
TINY_QUEUE = """
name: "tiny_queue"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] },
  { name: "label" data_type: TYPE_INT64 dims: [ ] }
]
dynamic_batching {
  preferred_batch_size: [ 4 ]
  max_queue_delay_microseconds: 30000000
  default_queue_policy { max_queue_size: 1 }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = copy_models(tmp_path_factory.mktemp("metrics"), "digits", "add_sub")
    tiny = repository / "tiny_queue"
    (tiny / "1").mkdir(parents=True)
    (tiny / "1" / "model.onnx").write_bytes((repository / "digits" / "1" / "model.onnx").read_bytes())
    (tiny / "config.pbtxt").write_text(TINY_QUEUE)
    with telemetry_server(repository, metrics_address="127.0.0.1:0") as (thread, _):
        yield thread


@pytest.fixture
def metrics(server: ServerThread) -> str:
    address = server.server.telemetry.metrics_address
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    return address


def _image(rows: int = 1) -> dict[str, np.ndarray]:
    return {"image": np.zeros((rows, 1, 8, 8), np.float32)}


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, items), value in samples.items() if sample == name and wanted <= set(items))


def _scrape_until(metrics: str, condition: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until `condition` holds (calls that failed are recorded just after their caller hears of it)."""

    def probe() -> Samples | None:
        samples = scrape(metrics)
        return samples if condition(samples) else None

    return wait_for(probe, what=what)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def test_requests_move_the_counters_histograms_and_busy_time(server: ServerThread, metrics: str) -> None:
    before = scrape(metrics)
    with Client(server.address) as client:
        for rows in (1, 2, 1, 3, 1):
            client.predict("digits", _image(rows))
    after = scrape(metrics)

    digits = {"model": "digits", "version": "1"}
    assert _delta(before, after, "tensorgate_requests_total", **digits, rpc=PREDICT, code="OK") == 5
    assert (
        _total(after, "tensorgate_requests_total", **digits, rpc=PREDICT)
        - _total(before, "tensorgate_requests_total", **digits, rpc=PREDICT)
        == 5
    )
    assert _delta(before, after, "tensorgate_request_duration_seconds_count", **digits, rpc=PREDICT) == 5
    assert _delta(before, after, "tensorgate_request_duration_seconds_sum", **digits, rpc=PREDICT) > 0
    for stage in ("decode", "route", "queue", "encode"):  # per request
        assert _delta(before, after, "tensorgate_stage_duration_seconds_count", **digits, stage=stage) == 5, stage
    batches = _delta(before, after, "tensorgate_batch_size_count", **digits)
    assert 1 <= batches <= 5
    for stage in ("batch", "infer", "scatter"):  # per batch
        assert _delta(before, after, "tensorgate_stage_duration_seconds_count", **digits, stage=stage) == batches
    assert _delta(before, after, "tensorgate_batch_size_sum", **digits) == 8  # rows
    busy = _total(after, "tensorgate_engine_busy_seconds_total", **digits) - _total(
        before, "tensorgate_engine_busy_seconds_total", **digits
    )
    assert busy > 0
    assert _value(after, "tensorgate_rpcs_in_flight", rpc=PREDICT) == 0


def test_gauges_say_what_serves_each_model_and_how_busy_it_is(server: ServerThread, metrics: str) -> None:
    with Client(server.address) as client:
        engine = client.metadata("digits").engine
    samples = scrape(metrics)
    info = {
        dict(items)["model"]: dict(items)
        for (name, items), value in samples.items()
        if name == "tensorgate_model_engine_info" and value == 1
    }
    assert set(info) == {"add_sub", "digits", "tiny_queue"}
    assert info["digits"]["engine"] == engine
    assert info["digits"]["platform"] == "onnxruntime_onnx"
    assert _value(samples, "tensorgate_model_ready", model="digits", version="1") == 1
    assert _value(samples, "tensorgate_queue_depth", model="digits", version="1") == 0
    assert ("tensorgate_inflight_requests", (("model", "digits"), ("version", "1"))) in samples


def test_a_rejected_request_counts_once_under_its_code(server: ServerThread, metrics: str) -> None:
    before = scrape(metrics)
    with Client(server.address) as client:
        with pytest.raises(InvalidArgumentError):
            client.predict("digits", {"image": np.zeros((1, 64), np.float32)})
        with pytest.raises(NotFoundError):
            client.predict("no-such-model", _image())

    # grpc.aio sends an abort's status before the interceptor records it: wait for the record.

    def calls(samples: Samples) -> float:
        return _total(samples, "tensorgate_requests_total", rpc=PREDICT)

    after = _scrape_until(metrics, lambda s: calls(s) - calls(before) >= 2, "both failed calls to be counted")
    digits = {"model": "digits", "version": "1", "rpc": PREDICT}
    assert _delta(before, after, "tensorgate_requests_total", **digits, code="INVALID_ARGUMENT") == 1
    assert _delta(before, after, "tensorgate_requests_total", **digits, code="OK") == 0
    # An unknown model is not a label value (clients could grow the series without bound).
    unknown = {"model": "", "version": "", "rpc": PREDICT}
    assert _delta(before, after, "tensorgate_requests_total", **unknown, code="NOT_FOUND") == 1
    assert (
        _total(after, "tensorgate_requests_total", rpc=PREDICT)
        - _total(before, "tensorgate_requests_total", rpc=PREDICT)
        == 2
    )


def test_a_full_queue_counts_once_as_resource_exhausted_while_the_gauges_show_the_wait(
    server: ServerThread, metrics: str
) -> None:
    before = scrape(metrics)
    tiny = {"model": "tiny_queue", "version": "1"}
    request = predict_pb2.PredictRequest(
        model="tiny_queue", inputs=[to_tensor("image", np.zeros((1, 1, 8, 8), np.float32))]
    )
    with grpc.insecure_channel(server.address) as channel:
        waiting = predict_pb2_grpc.PredictStub(channel).Predict.future(request, timeout=60)
        try:
            during = _scrape_until(
                metrics, lambda s: _value(s, "tensorgate_queue_depth", **tiny) == 1, "the first request to be queued"
            )
            assert _value(during, "tensorgate_rpcs_in_flight", rpc=PREDICT) >= 1
            with Client(server.address) as client, pytest.raises(ResourceExhaustedError):
                client.predict("tiny_queue", _image())
        finally:
            cast(Any, waiting).cancel()

    def settled() -> Samples | None:
        samples = scrape(metrics)
        calls = _total(samples, "tensorgate_requests_total", **tiny) - _total(
            before, "tensorgate_requests_total", **tiny
        )
        return samples if calls >= 2 and _value(samples, "tensorgate_queue_depth", **tiny) == 0 else None

    after = wait_for(settled, what="both calls to be counted and the queue to empty")
    assert _delta(before, after, "tensorgate_requests_total", **tiny, rpc=PREDICT, code="RESOURCE_EXHAUSTED") == 1
    assert _delta(before, after, "tensorgate_requests_total", **tiny, rpc=PREDICT, code="CANCELLED") == 1
    assert _delta(before, after, "tensorgate_requests_total", **tiny, rpc=PREDICT, code="OK") == 0
    # Neither call ran: no batch, no engine time.
    assert _delta(before, after, "tensorgate_batch_size_count", **tiny) == 0


def test_a_stream_counts_once_and_its_frames_per_stage(server: ServerThread, metrics: str) -> None:
    before = scrape(metrics)
    config = stream_pb2.StreamConfig(model="add_sub", outputs=["sum"], drop_policy=stream_pb2.DROP_POLICY_BLOCK)
    a = np.ones((1, 4), np.float32)
    frames = [
        stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=i, inputs=[to_tensor("a", a), to_tensor("b", a)]))
        for i in range(3)
    ]
    with grpc.insecure_channel(server.address) as channel:
        results = list(
            stream_pb2_grpc.StreamStub(channel).Stream(
                iter([stream_pb2.StreamRequest(config=config), *frames]), timeout=30
            )
        )
    assert len(results) == 3
    add_sub = {"model": "add_sub", "version": "1"}
    after = _scrape_until(
        metrics,
        lambda s: _delta(before, s, "tensorgate_requests_total", **add_sub, rpc=STREAM, code="OK") == 1,
        "the stream to be counted",
    )
    assert _delta(before, after, "tensorgate_stage_duration_seconds_count", **add_sub, stage="route") == 3
    assert _delta(before, after, "tensorgate_stage_duration_seconds_count", **add_sub, stage="queue") == 3
    # A stream's lifetime is not a latency: it stays out of the end-to-end histogram.
    assert _delta(before, after, "tensorgate_request_duration_seconds_count", **add_sub, rpc=STREAM) == 0


def test_gpu_metrics_appear_exactly_where_nvml_works(metrics: str) -> None:
    collector = nvml_collector()
    if collector is not None:
        collector.close()
    gpu = [name for name, _ in scrape(metrics) if name.startswith("tensorgate_gpu_")]
    assert bool(gpu) == (collector is not None)
