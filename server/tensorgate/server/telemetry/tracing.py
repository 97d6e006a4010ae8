"""OpenTelemetry tracing: the server's own tracer provider, its sampler and exporters, and the spans we make.

Only imported when tracing is on: it needs `opentelemetry-sdk` (the `observability` extra).

Sampling is parent-based. A call whose `traceparent` says "sampled" is traced, one that says "not sampled" is not;
a call without one starts a trace with probability `sample_ratio`. The decision is made here, before the SDK is
involved, so an unsampled call costs a metadata scan and one random draw, and creates no span object at all (the
SDK's own ParentBased(TraceIdRatioBased) sampler would cost a span context per call; deciding a root by a random
draw rather than by the bits of a fresh random trace id is the same distribution). The provider's sampler is
therefore ParentBased(ALWAYS_ON): it only ever sees calls that were chosen.

Exporters come from the standard environment: `OTEL_TRACES_EXPORTER` (comma-separated: `otlp` (the default),
`console`, `none`), `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default, or
`http/protobuf`), and what the exporters read themselves: `OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`, `_HEADERS`,
`_TIMEOUT`, `OTEL_BSP_*`. `OTEL_SERVICE_NAME` (default "tensorgate") and `OTEL_RESOURCE_ATTRIBUTES` describe the
process. The provider is the server's own, not the process-global one, so several servers can share a process.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata as package_metadata
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tensorgate.server.telemetry.context import MethodInfo

__all__ = ["STAGES", "Tracing", "exporters_from_env"]

#: The data path's stages, in order: span names and the `stage` label of the stage histogram.
STAGES = ("decode", "route", "queue", "batch", "infer", "scatter", "encode")

#: Status codes that mark a server span as an error (OpenTelemetry's gRPC conventions); the others are the
#: caller's doing, recorded in `rpc.grpc.status_code` only.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})

_PROPAGATOR = TraceContextTextMapPropagator()


def _version() -> str:
    try:
        return package_metadata.version("tensorgate")
    except package_metadata.PackageNotFoundError:  # running from a source tree without an install
        return "0"


def exporters_from_env(environ: Mapping[str, str]) -> list[tuple[str, SpanExporter]]:
    """The span exporters `OTEL_TRACES_EXPORTER` names, with a short description of each.

    Raises ValueError for an exporter or protocol we do not know, ImportError when its package is missing.
    """
    names = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if name.strip()]
    exporters: list[tuple[str, SpanExporter]] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(("console", ConsoleSpanExporter()))
            continue
        if name not in ("otlp", "otlp_proto_grpc", "otlp_proto_http"):
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (known: otlp, console, none)")
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        )
        if name == "otlp_proto_http":
            protocol = "http/protobuf"
        elif name == "otlp_proto_grpc":
            protocol = "grpc"
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporters.append((f"otlp grpc {endpoint or 'localhost:4317'}", GrpcExporter()))
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporters.append((f"otlp http/protobuf {endpoint or 'http://localhost:4318'}", HttpExporter()))
        else:
            raise ValueError(f"OTLP protocol {protocol!r} is not supported (grpc or http/protobuf)")
    return exporters


def _peer_attributes(peer: str) -> dict[str, Any]:
    """`network.peer.*` from gRPC's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...")."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {}
    host, _, port = rest.rpartition(":")
    attributes: dict[str, Any] = {"network.peer.address": host.strip("[]"), "network.type": kind}
    if port.isdigit():
        attributes["network.peer.port"] = int(port)
    return attributes


class Tracing:
    """The server's tracer: sampling decisions and every span the server makes."""

    def __init__(
        self,
        *,
        sample_ratio: float,
        frame_ratio: float,
        environ: Mapping[str, str] | None = None,
        exporters: Sequence[tuple[str, SpanExporter]] | None = None,
    ) -> None:
        if not 0.0 <= sample_ratio <= 1.0 or not 0.0 <= frame_ratio <= 1.0:
            raise ValueError(f"sampling ratios must be within 0..1 (got {sample_ratio} and {frame_ratio})")
        env = os.environ if environ is None else environ
        self.sample_ratio = sample_ratio
        self.frame_ratio = frame_ratio
        self.exporters = list(exporters_from_env(env) if exporters is None else exporters)
        service = env.get("OTEL_SERVICE_NAME") or "tensorgate"
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: service}), sampler=ParentBased(root=ALWAYS_ON)
        )
        for _, exporter in self.exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("tensorgate.server", _version())
        self.server_attributes: dict[str, Any] = {}
        self._random = random.random

    def describe(self) -> str:
        """One line for the startup banner."""
        where = ", ".join(name for name, _ in self.exporters) or "no exporter (OTEL_TRACES_EXPORTER=none)"
        return (
            f"tracing: parent-based, {self.sample_ratio:g} of new traces, {self.frame_ratio:g} of a traced "
            f"stream's frames; export: {where}"
        )

    def add_span_processor(self, processor: SpanProcessor) -> None:
        """Send spans to one more processor (tests add an in-memory exporter this way)."""
        self.provider.add_span_processor(processor)

    def set_server_address(self, host: str, port: int) -> None:
        """The bound address, recorded on every server span (`server.address`, `server.port`)."""
        self.server_attributes = {"server.address": host, "server.port": port}

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporters."""
        self.provider.shutdown()

    # -- sampling and the RPC span -------------------------------------------------------------------------

    def start_rpc_span(
        self,
        info: MethodInfo,
        metadata: Iterable[tuple[str, str | bytes]] | None,
        peer: str | Callable[[], str],
        start_ns: int,
    ) -> Span | None:
        """The server span of a call, continuing the caller's `traceparent`; None when the call is not sampled.

        `peer` is gRPC's peer string, or a function giving it (only called for a sampled call).
        """
        traceparent: str | bytes | None = None
        tracestate: str | bytes | None = None
        for key, value in metadata or ():
            if key == "traceparent":
                traceparent = value
            elif key == "tracestate":
                tracestate = value
        parent = None
        if traceparent is not None and isinstance(traceparent, str):
            # The flags are the last two hex digits; bit 0 is "sampled". An unsampled caller is not traced.
            try:
                flags = int(traceparent[-2:], 16)
            except ValueError:
                flags = 1  # malformed: the propagator refuses it below
            if len(traceparent) >= 55 and not flags & 1:
                return None
            carrier = {"traceparent": traceparent}
            if isinstance(tracestate, str):
                carrier["tracestate"] = tracestate
            parent = _PROPAGATOR.extract(carrier)
            if not trace.get_current_span(parent).get_span_context().is_valid:
                parent = None  # malformed: the call starts a trace of its own
        if parent is None and (self.sample_ratio <= 0.0 or self._random() >= self.sample_ratio):
            return None
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": info.service,
            "rpc.method": info.method,
            **self.server_attributes,
            **_peer_attributes(peer if isinstance(peer, str) else peer()),
        }
        return self.tracer.start_span(
            info.name, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start_ns
        )

    def end_rpc_span(self, span: Span, code: str, number: int, details: str | None, end_ns: int) -> None:
        """Record the call's status and end its span."""
        span.set_attribute("rpc.grpc.status_code", number)
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, f"{code}: {details}" if details else code))
        span.end(end_time=end_ns)

    def sample_frame(self) -> bool:
        """Whether one frame (or item) of a traced stream gets its own span."""
        return self.frame_ratio > 0.0 and self._random() < self.frame_ratio

    # -- child spans ---------------------------------------------------------------------------------------

    def start_span(
        self,
        name: str,
        parent: Span,
        start_ns: int,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Span] = (),
    ) -> Span:
        """A child of `parent` that is ended later by the caller; `links` point at other spans."""
        return self.tracer.start_span(
            name,
            context=trace.set_span_in_context(parent),
            attributes=attributes,
            links=[Link(span.get_span_context()) for span in links],
            start_time=start_ns,
        )

    def record(
        self,
        name: str,
        parent: Span,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """A finished child of `parent` over [start_ns, end_ns] (a stage timed before its span was made)."""
        span = self.tracer.start_span(
            name, context=trace.set_span_in_context(parent), attributes=attributes, start_time=start_ns
        )
        if error is not None:
            fail(span, error)
        span.end(end_time=max(end_ns, start_ns))


def fail(span: Span, error: BaseException) -> None:
    """Mark `span` as failed by `error` (its type and message; server errors carry their status code name)."""
    code = getattr(error, "code", None)
    if isinstance(code, str):
        span.set_attribute("tensorgate.error.code", code)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
