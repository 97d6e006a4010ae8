"""Telemetry without a server: what the settings turn on, sampling decisions, exporters from OTEL_*, log lines,
the metrics' helpers, GPU metrics through a stand-in NVML, the client's trace propagation."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.client import _tracing as client_tracing
from tensorgate.server.settings import ServerSettings
from tensorgate.server.telemetry import RequestTrace, RpcScope, Telemetry, count_dropped_frames
from tensorgate.server.telemetry.context import MethodInfo, _request, _scope
from tensorgate.server.telemetry.logging import ContextFilter, JsonFormatter, TextFormatter, build_handler, configure
from tensorgate.server.telemetry.metrics import Distribution, Metrics, nvml_collector
from tensorgate.server.telemetry.tracing import Tracing, _peer_attributes, exporters_from_env

PREDICT = MethodInfo.parse("/tensorgate.v1.Predict/Predict", streaming=False)


# -- what the settings turn on ----------------------------------------------------------------------------------


def test_everything_is_off_by_default_and_nothing_is_installed() -> None:
    telemetry = Telemetry(ServerSettings())
    assert (telemetry.tracing, telemetry.metrics, telemetry.access_log) == (None, None, False)
    assert not telemetry.enabled
    # No interceptor, no probe, no wrapped batch runner: the request path is the plain one.
    assert telemetry.interceptor(None) is None  # type: ignore[arg-type]
    assert telemetry.probe is None
    assert telemetry.instrumentation is None


def test_tracing_and_metrics_when_asked() -> None:
    settings = ServerSettings(tracing=True, metrics_address="127.0.0.1:0", trace_sample_ratio=0.25)
    telemetry = Telemetry(settings, environ={"OTEL_TRACES_EXPORTER": "none"})
    try:
        assert telemetry.tracing is not None
        assert telemetry.tracing.sample_ratio == 0.25
        assert telemetry.metrics is not None
        assert telemetry.probe is not None
        assert telemetry.instrumentation is not None
    finally:
        telemetry.stop()


def test_otel_sdk_disabled_turns_tracing_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    telemetry = Telemetry(ServerSettings(tracing=True), environ={"OTEL_SDK_DISABLED": "true"})
    assert telemetry.tracing is None
    assert telemetry.notes == ["tracing is off: OTEL_SDK_DISABLED=true"]
    assert "OTEL_SDK_DISABLED" in caplog.text


@pytest.mark.parametrize("name", ["trace_sample_ratio", "trace_frame_ratio"])
def test_ratios_outside_zero_to_one_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Telemetry(ServerSettings(tracing=True).with_values({name: 1.5}), environ={"OTEL_TRACES_EXPORTER": "none"})


def test_without_the_observability_extra_tracing_and_metrics_are_off_with_a_clear_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("opentelemetry", "prometheus_client") or name in (
            "tensorgate.server.telemetry.tracing",
            "tensorgate.server.telemetry.metrics",
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # what an absent package looks like to import
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    telemetry = Telemetry(ServerSettings(tracing=True, metrics_address="127.0.0.1:0", access_log=True))

    assert (telemetry.tracing, telemetry.metrics) == (None, None)
    assert telemetry.notes == [
        "tracing is off: opentelemetry is not installed (pip install 'tensorgate[observability]')",
        "metrics are off: prometheus_client is not installed (pip install 'tensorgate[observability]')",
    ]
    assert "tensorgate[observability]" in caplog.text
    assert telemetry.probe is None  # nothing to record per request; the access log still works per call


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("Yes", True), ("1", True), ("false", False), ("0", False)]
)
def test_boolean_settings_read_words(text: str, value: bool) -> None:
    settings = ServerSettings.from_sources({}, environ={"TENSORGATE_TRACING": text, "TENSORGATE_ACCESS_LOG": text})
    assert (settings.tracing, settings.access_log) == (value, value)


def test_a_boolean_setting_refuses_other_words() -> None:
    with pytest.raises(ValueError, match="tracing"):
        ServerSettings.from_sources({"tracing": "maybe"}, environ={})


# -- sampling and exporters ---------------------------------------------------------------------------------------


def _new_tracing(ratio: float, draws: list[float] | None = None) -> Tracing:
    tracing = Tracing(sample_ratio=ratio, frame_ratio=0.5, exporters=[])
    if draws is not None:
        tracing._random = iter(draws).__next__
    return tracing


def test_new_traces_are_sampled_at_the_ratio() -> None:
    tracing = _new_tracing(0.25, [0.1, 0.3, 0.2499, 0.25])
    decisions = [tracing.start_rpc_span(PREDICT, (), "ipv4:127.0.0.1:1", 0) is not None for _ in range(4)]
    assert decisions == [True, False, True, False]
    assert _new_tracing(0.0).start_rpc_span(PREDICT, (), "", 0) is None


def test_a_callers_sampled_flag_decides_whatever_the_ratio() -> None:
    tracing = _new_tracing(0.0)
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    span = tracing.start_rpc_span(PREDICT, [("traceparent", f"00-{trace_id}-{span_id}-01")], "", 0)
    assert span is not None
    assert format(span.get_span_context().trace_id, "032x") == trace_id
    assert tracing.start_rpc_span(PREDICT, [("traceparent", f"00-{trace_id}-{span_id}-00")], "", 0) is None
    # Always sampled at ratio 1, but never when the caller said no.
    assert _new_tracing(1.0).start_rpc_span(PREDICT, [("traceparent", f"00-{trace_id}-{span_id}-00")], "", 0) is None


def test_a_malformed_traceparent_starts_a_trace_of_its_own_at_the_ratio() -> None:
    assert _new_tracing(0.0).start_rpc_span(PREDICT, [("traceparent", "garbage-01")], "", 0) is None
    assert _new_tracing(0.0).start_rpc_span(PREDICT, [("traceparent", f"00-{'1' * 32}-{'2' * 16}-zz")], "", 0) is None
    assert _new_tracing(1.0).start_rpc_span(PREDICT, [("traceparent", f"00-{'1' * 32}-{'2' * 16}-zz")], "", 0)
    span = _new_tracing(1.0).start_rpc_span(PREDICT, [("traceparent", "garbage-01")], "", 0)
    assert span is not None
    assert span.parent is None  # type: ignore[attr-defined]


def test_frames_are_sampled_at_the_frame_ratio() -> None:
    tracing = _new_tracing(1.0, [0.4, 0.6])
    assert [tracing.sample_frame(), tracing.sample_frame()] == [True, False]


@pytest.mark.parametrize(
    ("environ", "described"),
    [
        ({}, ["otlp grpc localhost:4317"]),
        ({"OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            ["otlp http/protobuf http://localhost:4318", "console"],
        ),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"},
            ["otlp grpc http://collector:4317"],
        ),
    ],
)
def test_exporters_come_from_the_standard_environment(environ: dict[str, str], described: list[str]) -> None:
    exporters = exporters_from_env(environ)
    assert [name for name, _ in exporters] == described
    for _, exporter in exporters:
        exporter.shutdown()


def test_unknown_exporters_and_protocols_are_refused() -> None:
    with pytest.raises(ValueError, match="zipkin"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/json"):
        exporters_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_the_service_name_comes_from_otel_service_name() -> None:
    tracing = Tracing(sample_ratio=1, frame_ratio=0, environ={"OTEL_SERVICE_NAME": "edge-1"}, exporters=[])
    assert tracing.provider.resource.attributes["service.name"] == "edge-1"
    default = Tracing(sample_ratio=1, frame_ratio=0, environ={}, exporters=[("console", ConsoleSpanExporter())])
    assert default.provider.resource.attributes["service.name"] == "tensorgate"
    default.shutdown()


def test_peer_attributes_follow_the_conventions() -> None:
    assert _peer_attributes("ipv4:10.0.0.7:51000") == {
        "network.peer.address": "10.0.0.7",
        "network.peer.port": 51000,
        "network.type": "ipv4",
    }
    assert _peer_attributes("ipv6:[::1]:8001")["network.peer.address"] == "::1"
    assert _peer_attributes("unix:/tmp/socket") == {}


def test_method_names_split_like_the_rpc_conventions() -> None:
    info = MethodInfo.parse("/inference.GRPCInferenceService/ModelInfer", streaming=False)
    assert (info.name, info.service, info.method) == (
        "inference.GRPCInferenceService/ModelInfer",
        "inference.GRPCInferenceService",
        "ModelInfer",
    )


# -- logs ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def span() -> Iterator[Any]:
    with TracerProvider().get_tracer("test").start_as_current_span("request") as current:
        yield current


def _record(message: str = "hello", **extra: Any) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "tensorgate.x", "levelname": "INFO", "levelno": 20, "msg": message})
    record.__dict__.update(extra)
    return record


def test_lines_logged_in_a_request_carry_its_ids(span: Any) -> None:
    scope = RpcScope(PREDICT, 0, None)
    scope.span, scope.request_id = span, "req-9"
    token = _scope.set(scope)
    try:
        record = _record()
        ContextFilter().filter(record)
    finally:
        _scope.reset(token)
    context = span.get_span_context()
    assert vars(record)["request_id"] == "req-9"
    assert vars(record)["trace_id"] == format(context.trace_id, "032x")
    assert vars(record)["span_id"] == format(context.span_id, "016x")


def test_a_traced_frame_logs_its_own_span_and_request_id(span: Any) -> None:
    scope = RpcScope(PREDICT, 0, None)
    token = _scope.set(scope)
    frame = _request.set(RequestTrace(span, "frame-3"))
    try:
        record = _record()
        ContextFilter().filter(record)
    finally:
        _request.reset(frame)
        _scope.reset(token)
    ids = vars(record)
    assert (ids["request_id"], ids["span_id"]) == ("frame-3", format(span.get_span_context().span_id, "016x"))


def test_lines_outside_a_request_carry_no_ids() -> None:
    record = _record()
    ContextFilter().filter(record)
    assert (vars(record)["trace_id"], vars(record)["span_id"], vars(record)["request_id"]) == ("", "", "")
    assert TextFormatter().format(record).endswith("INFO tensorgate.x: hello")
    assert set(json.loads(JsonFormatter().format(record))) == {"time", "level", "logger", "message"}


def test_json_lines_have_the_ids_extra_fields_and_the_exception() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record("failed", trace_id="ab" * 16, span_id="cd" * 8, request_id="r1", rpc="x/Y")
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed"
    assert (line["trace_id"], line["span_id"], line["request_id"], line["rpc"]) == ("ab" * 16, "cd" * 8, "r1", "x/Y")
    assert "RuntimeError: boom" in line["exception"]
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith(f"failed [request_id=r1 trace_id={'ab' * 16} span_id={'cd' * 8}]")
    assert "RuntimeError: boom" in text


def test_configure_routes_every_logger_through_one_handler() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    try:
        configure("warning", "json", stream)
        logging.getLogger("tensorgate.somewhere").warning("one")
        logging.getLogger("tensorgate.somewhere").info("dropped")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["one"]
    with pytest.raises(ValueError, match="yaml"):
        build_handler("yaml")


# -- metrics helpers -------------------------------------------------------------------------------------------------


def _value(metrics: Metrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_dropped_frames_are_counted_in_the_calls_context_and_nowhere_else() -> None:
    metrics = Metrics()
    count_dropped_frames("camera", 3)  # no call: nothing to count, nothing raised
    token = _scope.set(RpcScope(PREDICT, 0, metrics))
    try:
        count_dropped_frames("camera", 3)
        count_dropped_frames("camera")
    finally:
        _scope.reset(token)
    assert _value(metrics, "tensorgate_stream_frames_dropped_total", {"model": "camera"}) == 4
    off = RpcScope(PREDICT, 0, None)  # metrics off
    token = _scope.set(off)
    try:
        count_dropped_frames("camera", 3)
    finally:
        _scope.reset(token)


def test_calls_are_counted_under_their_labels() -> None:
    metrics = Metrics()
    metrics.call_finished("m", "1", "svc/M", "OK", 0.002)
    metrics.call_finished("m", "1", "svc/M", "OK", None)
    metrics.call_finished("m", "1", "svc/M", "INTERNAL", 0.001)
    labels = {"model": "m", "version": "1", "rpc": "svc/M"}
    assert _value(metrics, "tensorgate_requests_total", {**labels, "code": "OK"}) == 2
    assert _value(metrics, "tensorgate_requests_total", {**labels, "code": "INTERNAL"}) == 1
    assert _value(metrics, "tensorgate_request_duration_seconds_count", labels) == 2
    assert metrics.stages("m", "1") is metrics.stages("m", "1")


def test_a_distribution_counts_like_a_prometheus_histogram() -> None:
    distribution = Distribution((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.01, 5.0):
        distribution.observe(value)
    buckets, total = distribution.snapshot()
    # le buckets, cumulative: a value equal to a bound falls in that bound's bucket.
    assert buckets == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]
    assert total == pytest.approx(5.0135)


def test_the_exposition_parses_and_adds_up() -> None:
    metrics = Metrics()
    metrics.stages("m", "1").queue.observe(0.003)
    metrics.stages("m", "1").queue.observe(0.2)
    metrics.batch_size("m", "1").observe(4)
    metrics.engine_busy("m", "1", 0).inc(0.5)
    gauge = metrics.in_flight("svc/M")
    gauge.inc()
    gauge.inc()
    gauge.dec()
    families = {
        family.name: family for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
    }
    queue = {
        (s.name, s.labels.get("le")): s.value
        for s in families["tensorgate_stage_duration_seconds"].samples
        if s.labels["stage"] == "queue"
    }
    assert queue[("tensorgate_stage_duration_seconds_bucket", "0.0025")] == 0
    assert queue[("tensorgate_stage_duration_seconds_bucket", "0.005")] == 1
    assert queue[("tensorgate_stage_duration_seconds_bucket", "+Inf")] == 2
    assert queue[("tensorgate_stage_duration_seconds_count", None)] == 2
    assert queue[("tensorgate_stage_duration_seconds_sum", None)] == pytest.approx(0.203)
    assert _value(metrics, "tensorgate_batch_size_bucket", {"model": "m", "version": "1", "le": "4.0"}) == 1
    assert (
        _value(metrics, "tensorgate_engine_busy_seconds_total", {"model": "m", "version": "1", "instance": "0"}) == 0.5
    )
    assert _value(metrics, "tensorgate_rpcs_in_flight", {"rpc": "svc/M"}) == 1


class FakeNvml:
    """The few NVML calls the collector makes, for one 80 GB GPU at 42% utilisation."""

    def __init__(self, *, init_error: Exception | None = None) -> None:
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self) -> None:  # noqa: N802 (NVML's names)
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"gpu{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:  # noqa: N802
        return b"NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=42)


def test_gpu_memory_and_utilisation_through_nvml() -> None:
    fake = FakeNvml()
    collector = nvml_collector(fake)
    assert collector is not None
    samples = {
        (sample.name, sample.labels["gpu"], sample.labels["name"]): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    assert samples == {
        ("tensorgate_gpu_memory_used_bytes", "0", "NVIDIA H100"): 3 * 2**30,
        ("tensorgate_gpu_memory_total_bytes", "0", "NVIDIA H100"): 80 * 2**30,
        ("tensorgate_gpu_utilization_ratio", "0", "NVIDIA H100"): 0.42,
    }
    collector.close()
    assert fake.shutdowns == 1


def test_no_gpu_metrics_where_nvml_does_not_initialise() -> None:
    assert nvml_collector(FakeNvml(init_error=RuntimeError("NVML Shared Library Not Found"))) is None


# -- the client's trace propagation ----------------------------------------------------------------------------


def test_the_client_adds_the_current_trace_context() -> None:
    fixed = (("authorization", "Bearer x"),)
    assert client_tracing.outgoing(fixed) is fixed  # no current span: nothing to add
    with TracerProvider().get_tracer("app").start_as_current_span("caller") as caller:
        metadata = client_tracing.outgoing(fixed)
    assert metadata is not None
    assert metadata[0] == fixed[0]
    headers = dict(metadata[1:])
    context = caller.get_span_context()
    version, trace_id, span_id, flags = str(headers["traceparent"]).split("-")
    assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled (the SDK may also set W3C level 2's random-trace-id bit)
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_without_opentelemetry_the_client_sends_its_metadata_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_tracing, "_propagate", None)
    assert not client_tracing.available()
    with TracerProvider().get_tracer("app").start_as_current_span("caller"):
        assert client_tracing.outgoing(None) is None
