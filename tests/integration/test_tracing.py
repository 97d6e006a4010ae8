"""Traces from the real server, read back from the SDK's in-memory exporter: the span tree of a request, the
batch's links to its members, the caller's trace continued, sampling, streams, the Open Inference Protocol."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tensorgate.client.tensors import to_tensor
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc
from tests.support.serving import ServerThread, copy_models
from tests.support.telemetry import spans_named, telemetry_server, wait_for

PREDICT = "tensorgate.v1.Predict/Predict"
STAGES = ["decode", "route", "queue", "batch", "infer", "scatter", "encode"]

#: A copy of digits that waits (up to 10 s) until 4 rows are queued: 4 concurrent requests make one batch.
BATCH_OF_4 = """
name: "batched"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] },
  { name: "label" data_type: TYPE_INT64 dims: [ ] }
]
dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 10000000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, InMemorySpanExporter]]:
    repository = copy_models(tmp_path_factory.mktemp("traced"), "digits", "add_sub")
    batched = repository / "batched"
    (batched / "1").mkdir(parents=True)
    (batched / "1" / "model.onnx").write_bytes((repository / "digits" / "1" / "model.onnx").read_bytes())
    (batched / "config.pbtxt").write_text(BATCH_OF_4)
    with telemetry_server(repository, tracing=True, trace_sample_ratio=1.0, trace_frame_ratio=1.0) as served:
        yield served


@pytest.fixture
def server(traced: tuple[ServerThread, InMemorySpanExporter]) -> ServerThread:
    return traced[0]


@pytest.fixture
def exporter(traced: tuple[ServerThread, InMemorySpanExporter]) -> InMemorySpanExporter:
    traced[1].clear()
    return traced[1]


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as chan:
        yield chan


def _predict(model: str, request_id: str) -> predict_pb2.PredictRequest:
    image = to_tensor("image", np.zeros((1, 1, 8, 8), np.float32))
    return predict_pb2.PredictRequest(model=model, inputs=[image], request_id=request_id)


def _traceparent(sampled: bool = True) -> tuple[str, int, int]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", int(trace_id, 16), int(span_id, 16)


def _server_span(exporter: InMemorySpanExporter, request_id: str, name: str = PREDICT) -> ReadableSpan:
    def find() -> ReadableSpan | None:
        for span in spans_named(exporter, name):
            if span.attributes is not None and span.attributes.get("tensorgate.request_id") == request_id:
                return span
        return None

    return wait_for(find, what=f"the {name} span of request {request_id}")


def _children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return sorted(
        (
            s
            for s in exporter.get_finished_spans()
            if s.parent is not None and s.parent.span_id == parent.context.span_id
        ),
        key=lambda s: (s.start_time or 0, STAGES.index(s.name) if s.name in STAGES else 99),
    )


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_a_request_continues_the_callers_trace_with_a_span_per_stage(
    server: ServerThread, exporter: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    traceparent, trace_id, caller_span = _traceparent()
    predict_pb2_grpc.PredictStub(channel).Predict(
        _predict("digits", "stages-1"), metadata=(("traceparent", traceparent),), timeout=30
    )

    span = _server_span(exporter, "stages-1")
    assert span.kind is SpanKind.SERVER
    assert span.context is not None
    assert span.context.trace_id == trace_id
    assert span.parent is not None
    assert span.parent.span_id == caller_span
    assert span.parent.is_remote
    attributes = _attributes(span)
    host, port = server.address.rsplit(":", 1)
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "tensorgate.v1.Predict"
    assert attributes["rpc.method"] == "Predict"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["server.address"] == host
    assert attributes["server.port"] == int(port)
    assert attributes["network.peer.address"] == "127.0.0.1"
    assert attributes["tensorgate.model"] == "digits"
    assert attributes["tensorgate.model.version"] == "1"
    assert span.status.status_code is StatusCode.UNSET

    children = _children(exporter, span)
    assert sorted(child.name for child in children) == sorted(STAGES)
    # In the data path's order (each starts no earlier than the one before it), all in the caller's trace.
    by_name = {child.name: child for child in children}
    starts = [by_name[name].start_time or 0 for name in STAGES]
    assert starts == sorted(starts)
    assert all(child.context is not None and child.context.trace_id == trace_id for child in children)

    infer = by_name["infer"]
    assert [link.context.span_id for link in infer.links] == [span.context.span_id]
    infer_attributes = _attributes(infer)
    assert infer_attributes["tensorgate.batch.request_ids"] == ("stages-1",)
    assert infer_attributes["tensorgate.engine"].startswith("onnxruntime")
    assert attributes["tensorgate.batch.id"] == infer_attributes["tensorgate.batch.id"]
    assert attributes["tensorgate.batch.size"] == infer_attributes["tensorgate.batch.size"] == 1


def test_the_batch_infer_span_links_every_member_and_members_record_the_batch(
    exporter: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    stub = predict_pb2_grpc.PredictStub(channel)
    ids = [f"member-{i}" for i in range(4)]
    calls = [stub.Predict.future(_predict("batched", request_id), timeout=30) for request_id in ids]
    for call in calls:
        call.result()

    members = {request_id: _server_span(exporter, request_id) for request_id in ids}
    (infer,) = [
        span
        for span in spans_named(exporter, "infer")
        if set(_attributes(span).get("tensorgate.batch.request_ids", ())) == set(ids)
    ]
    member_ids = {span.context.span_id for span in members.values() if span.context is not None}
    assert {link.context.span_id for link in infer.links} == member_ids
    assert len(infer.links) == 4
    # Four calls without a traceparent are four traces; the batch span sits in the first member's.
    assert infer.parent is not None
    assert infer.parent.span_id in member_ids
    assert infer.context is not None
    parent = next(s for s in members.values() if s.context is not None and s.context.span_id == infer.parent.span_id)
    assert parent.context is not None
    assert infer.context.trace_id == parent.context.trace_id
    attributes = _attributes(infer)
    assert attributes["tensorgate.batch.size"] == 4
    assert attributes["tensorgate.batch.requests"] == 4
    for span in members.values():
        assert _attributes(span)["tensorgate.batch.id"] == attributes["tensorgate.batch.id"]
        assert _attributes(span)["tensorgate.batch.size"] == 4


def test_a_caller_that_does_not_sample_gets_no_spans(exporter: InMemorySpanExporter, channel: grpc.Channel) -> None:
    traceparent, trace_id, _ = _traceparent(sampled=False)
    predict_pb2_grpc.PredictStub(channel).Predict(
        _predict("digits", "unsampled-1"), metadata=(("traceparent", traceparent),), timeout=30
    )
    # A successful unary call is recorded before its response is sent, so by now it would be there.
    assert not any(
        span.context is not None and span.context.trace_id == trace_id for span in exporter.get_finished_spans()
    )
    assert not [
        s for s in exporter.get_finished_spans() if _attributes(s).get("tensorgate.request_id") == "unsampled-1"
    ]


def test_sampling_is_parent_based_with_the_configured_ratio(
    server: ServerThread, exporter: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    tracing = server.server.telemetry.tracing
    assert tracing is not None
    stub = predict_pb2_grpc.PredictStub(channel)
    tracing.sample_ratio = 0.0
    try:
        stub.Predict(_predict("digits", "ratio-0"), timeout=30)
        traceparent, trace_id, _ = _traceparent()
        stub.Predict(_predict("digits", "ratio-0-parent"), metadata=(("traceparent", traceparent),), timeout=30)
    finally:
        tracing.sample_ratio = 1.0
    assert not [s for s in exporter.get_finished_spans() if _attributes(s).get("tensorgate.request_id") == "ratio-0"]
    followed = _server_span(exporter, "ratio-0-parent")
    assert followed.context is not None
    assert followed.context.trace_id == trace_id


def test_a_failed_request_records_its_status_and_where_it_failed(
    exporter: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    traceparent, trace_id, _ = _traceparent()
    with pytest.raises(grpc.RpcError) as caught:
        predict_pb2_grpc.PredictStub(channel).Predict(
            _predict("no-such-model", "missing-1"), metadata=(("traceparent", traceparent),), timeout=30
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND

    def find() -> ReadableSpan | None:
        for span in spans_named(exporter, PREDICT):
            if span.context is not None and span.context.trace_id == trace_id:
                return span
        return None

    span = wait_for(find, what="the failed call's span")
    assert _attributes(span)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # NOT_FOUND is the caller's mistake: recorded in the code, not as a server error.
    assert span.status.status_code is StatusCode.UNSET
    (route,) = [child for child in _children(exporter, span) if child.name == "route"]
    assert route.status.status_code is StatusCode.ERROR
    assert _attributes(route)["tensorgate.error.code"] == "NOT_FOUND"


def test_a_stream_has_one_span_and_a_span_per_sampled_frame(
    server: ServerThread, exporter: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    traceparent, trace_id, _ = _traceparent()
    results = list(
        stream_pb2_grpc.StreamStub(channel).Stream(
            iter([_stream_config(), *(_stream_frame(i) for i in range(5))]),
            metadata=(("traceparent", traceparent),),
            timeout=30,
        )
    )
    assert [result.sequence for result in results] == list(range(5))

    def find() -> ReadableSpan | None:
        for span in spans_named(exporter, "tensorgate.v1.Stream/Stream"):
            if span.context is not None and span.context.trace_id == trace_id:
                return span
        return None

    stream = wait_for(find, what="the stream's span")
    assert stream.kind is SpanKind.SERVER
    assert _attributes(stream)["rpc.grpc.status_code"] == 0
    assert _attributes(stream)["tensorgate.model"] == "add_sub"
    frames = [child for child in _children(exporter, stream) if child.name == "frame"]
    assert len(frames) == 5
    assert len({_attributes(frame)["tensorgate.request_id"] for frame in frames}) == 5
    for frame in frames:
        assert frame.context is not None
        # The batch's infer span is a child of its first traced member, and links every member.
        assert {child.name for child in _children(exporter, frame)} - {"infer"} == {
            "route",
            "queue",
            "batch",
            "scatter",
        }
        (infer,) = [
            s for s in spans_named(exporter, "infer") if frame.context.span_id in {k.context.span_id for k in s.links}
        ]
        assert infer.context is not None
        assert infer.context.trace_id == trace_id


def test_frames_are_sampled_at_the_frame_ratio(
    server: ServerThread, exporter: InMemorySpanExporter, channel: grpc.Channel
) -> None:
    tracing = server.server.telemetry.tracing
    assert tracing is not None
    tracing.frame_ratio = 0.0
    try:
        traceparent, trace_id, _ = _traceparent()
        results = list(
            stream_pb2_grpc.StreamStub(channel).Stream(
                iter([_stream_config(), *(_stream_frame(i) for i in range(3))]),
                metadata=(("traceparent", traceparent),),
                timeout=30,
            )
        )
    finally:
        tracing.frame_ratio = 1.0
    assert len(results) == 3

    def in_trace() -> list[ReadableSpan] | None:
        spans = [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]
        return spans if any(s.name == "tensorgate.v1.Stream/Stream" for s in spans) else None

    assert [span.name for span in wait_for(in_trace, what="the stream's span")] == ["tensorgate.v1.Stream/Stream"]


def test_open_inference_protocol_calls_are_traced_too(exporter: InMemorySpanExporter, channel: grpc.Channel) -> None:
    request = pb.ModelInferRequest(model_name="add_sub", id="oip-1")
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)

    span = _server_span(exporter, _only_request_id(exporter), "inference.GRPCInferenceService/ModelInfer")
    assert _attributes(span)["rpc.service"] == "inference.GRPCInferenceService"
    assert _attributes(span)["rpc.method"] == "ModelInfer"
    assert sorted(child.name for child in _children(exporter, span)) == sorted(STAGES)


def test_health_checks_are_not_traced(exporter: InMemorySpanExporter, channel: grpc.Channel) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert not [span for span in exporter.get_finished_spans() if "Health" in span.name]


def _only_request_id(exporter: InMemorySpanExporter) -> str:
    def find() -> str | None:
        for span in spans_named(exporter, "inference.GRPCInferenceService/ModelInfer"):
            value = _attributes(span).get("tensorgate.request_id")
            if isinstance(value, str):
                return value
        return None

    return wait_for(find, what="the ModelInfer span")


def _stream_config() -> stream_pb2.StreamRequest:
    config = stream_pb2.StreamConfig(model="add_sub", outputs=["sum"], drop_policy=stream_pb2.DROP_POLICY_BLOCK)
    return stream_pb2.StreamRequest(config=config)


def _stream_frame(sequence: int) -> stream_pb2.StreamRequest:
    a = np.full((1, 4), sequence, np.float32)
    return stream_pb2.StreamRequest(
        frame=stream_pb2.Frame(sequence=sequence, inputs=[to_tensor("a", a), to_tensor("b", a)])
    )
