"""Per-version statistics: what the batcher reports per batch (on a fake clock), what requests add, and how
ModelStatistics presents it; and our two ModelConfig messages being one on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from google.protobuf import descriptor as descriptor_mod
from google.protobuf import text_format

from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import model_config_pb2 as oip_config
from tensorgate.server.api.oip.models import model_statistics
from tensorgate.server.batching import Batcher, BatcherSettings, FakeClock
from tensorgate.server.statistics import VersionStatistics
from tensorgate.v1 import model_config_pb2 as v1_config

Array = npt.NDArray[Any]


async def settle(turns: int = 30) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_the_batcher_reports_queue_and_compute_time_per_batch() -> None:
    clock = FakeClock()
    statistics = VersionStatistics()

    async def run_batch(instance: int, inputs: dict[str, Array]) -> Mapping[str, Array]:
        clock.advance(0.004)  # the engine takes 4 ms
        return {"y": inputs["x"] * 2}

    settings = BatcherSettings(max_batch_size=8, max_queue_delay=0.010)
    batcher = Batcher(run_batch, settings, clock=clock, name="m", observer=statistics)
    await batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((2, 3), np.float32)}))
        await settle()
        clock.advance(0.002)
        second = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 3), np.float32)}))
        await settle()
        clock.advance(0.008)  # the oldest request has waited max_queue_delay: one batch of both
        await asyncio.gather(first, second)
        alone = asyncio.ensure_future(batcher.submit({"x": np.ones((3, 3), np.float32)}))
        await settle()
        clock.advance(0.010)
        assert (await alone)["y"].shape == (3, 3)
    finally:
        await batcher.stop()
    snapshot = statistics.snapshot()
    # Per request: the first waited 10 ms, the second 8 ms, the last one 10 ms more (its own delay).
    assert snapshot.queue.count == 3
    assert snapshot.queue.ns == pytest.approx(28_000_000, abs=10)
    # Each request is charged its whole batch's engine time; the engine ran twice for 4 ms.
    assert snapshot.compute_infer.count == 3
    assert snapshot.compute_infer.ns == pytest.approx(12_000_000, abs=10)
    assert (snapshot.compute_input.count, snapshot.compute_output.count) == (3, 3)
    assert (snapshot.inference_count, snapshot.execution_count) == (6, 2)
    assert snapshot.last_inference_ms > 0
    sizes = dict(snapshot.batch_sizes)
    assert sorted(sizes) == [3]  # both batches had 3 rows
    assert sizes[3].compute_infer.count == 2
    assert sizes[3].compute_infer.ns == pytest.approx(8_000_000, abs=10)
    # Requests themselves are counted by the request path, not by the batcher.
    assert (snapshot.success.count, snapshot.fail.count) == (0, 0)


async def test_a_failed_batch_is_not_counted_as_an_execution() -> None:
    statistics = VersionStatistics()

    async def broken(instance: int, inputs: dict[str, Array]) -> Mapping[str, Array]:
        raise RuntimeError("boom")

    batcher = Batcher(broken, BatcherSettings(max_batch_size=4), name="m", observer=statistics)
    await batcher.start()
    try:
        with pytest.raises(Exception, match="boom"):
            await batcher.submit({"x": np.ones((1, 1), np.float32)})
    finally:
        await batcher.stop()
    assert statistics.snapshot().execution_count == 0


def test_requests_and_the_wire_form() -> None:
    statistics = VersionStatistics()
    statistics.request_succeeded(1_500)
    statistics.request_succeeded(500)
    statistics.request_failed(300)
    statistics.batch_ran(rows=4, requests=2, queued=0.001, gather=0.0, infer=0.002, scatter=0.0001)
    snapshot = statistics.snapshot()
    statistics.request_succeeded(1)  # a snapshot does not move with later records
    message = model_statistics("m", 3, snapshot)
    assert (message.name, message.version, message.inference_count, message.execution_count) == ("m", "3", 4, 1)
    stats = message.inference_stats
    assert (stats.success.count, stats.success.ns, stats.fail.count, stats.fail.ns) == (2, 2_000, 1, 300)
    assert (stats.queue.count, stats.queue.ns) == (2, 1_000_000)
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (2, 4_000_000)
    assert (stats.compute_output.count, stats.compute_output.ns) == (2, 200_000)
    (batch,) = message.batch_stats
    assert (batch.batch_size, batch.compute_infer.count, batch.compute_infer.ns) == (4, 1, 2_000_000)
    assert message.last_inference == snapshot.last_inference_ms
    assert isinstance(message, pb.ModelStatistics)


# -- our two ModelConfig messages are one message on the wire ------------------------------------------------


#: Our own extensions of Triton's ModelConfig (field numbers from 1000): dropped when served as inference.ModelConfig.
TENSORGATE_ONLY = {"ModelConfig.routing"}


def _pairs(ours: descriptor_mod.Descriptor, theirs: descriptor_mod.Descriptor, path: str) -> list[str]:
    problems = []
    for field in ours.fields:
        if f"{path}.{field.name}" in TENSORGATE_ONLY:
            assert field.number >= 1000
            continue
        other = theirs.fields_by_name.get(field.name)
        where = f"{path}.{field.name}"
        if other is None:
            problems.append(f"{where}: missing from inference.ModelConfig")
            continue
        if (field.number, field.type, field.is_repeated) != (other.number, other.type, other.is_repeated):
            problems.append(f"{where}: number/type/label differ")
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            assert other.message_type is not None
            problems += _pairs(field.message_type, other.message_type, where)
        if field.enum_type is not None:
            assert other.enum_type is not None
            ours_values = {(v.name, v.number) for v in field.enum_type.values}
            if ours_values != {(v.name, v.number) for v in other.enum_type.values}:
                problems.append(f"{where}: enum values differ")
    return problems


def test_the_config_pbtxt_message_and_the_oip_message_agree_field_by_field() -> None:
    problems = _pairs(v1_config.ModelConfig.DESCRIPTOR, oip_config.ModelConfig.DESCRIPTOR, "ModelConfig")
    problems += _pairs(oip_config.ModelConfig.DESCRIPTOR, v1_config.ModelConfig.DESCRIPTOR, "inference.ModelConfig")
    assert problems == []


def test_a_full_config_converts_through_the_wire_unchanged() -> None:
    text = """
    name: "m" platform: "onnxruntime_onnx" backend: "onnxruntime" max_batch_size: 8
    version_policy { specific { versions: [1, 3] } }
    input { name: "x" data_type: TYPE_BF16 format: FORMAT_NCHW dims: [3, -1] optional: true }
    output { name: "y" data_type: TYPE_STRING dims: [2] label_filename: "labels.txt" }
    instance_group { name: "g" count: 2 kind: KIND_CPU gpus: [0] }
    default_model_filename: "model.onnx"
    dynamic_batching {
      preferred_batch_size: [2, 4] max_queue_delay_microseconds: 100 preserve_ordering: true
      priority_levels: 3 default_priority_level: 2
      default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 9 allow_timeout_override: true
                             max_queue_size: 5 }
    }
    parameters { key: "k" value { string_value: "v" } }
    """
    ours = text_format.Parse(text, v1_config.ModelConfig())
    converted = oip_config.ModelConfig.FromString(ours.SerializeToString())
    assert text_format.MessageToString(converted) == text_format.MessageToString(ours)
    assert converted.input[0].data_type == oip_config.TYPE_BF16
    assert converted.WhichOneof("scheduling_choice") == "dynamic_batching"
