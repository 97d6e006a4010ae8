"""Trace context propagation: a caller's OpenTelemetry trace continues into the server.

When `opentelemetry-api` is installed (`pip install 'tensorgate-client[otel]'`), every call carries the current
context in gRPC metadata through the globally configured propagator (W3C `traceparent` and `tracestate`, plus
baggage, unless `OTEL_PROPAGATORS` says otherwise). Without it, or outside any span, calls carry nothing extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Metadata", "available", "outgoing"]

Metadata = tuple[tuple[str, str | bytes], ...]

_propagate: Any
try:
    from opentelemetry import propagate as _propagate
except ImportError:  # the `otel` extra is not installed: nothing to propagate
    _propagate = None


def available() -> bool:
    """Whether trace context is propagated (OpenTelemetry is installed)."""
    return _propagate is not None


def outgoing(metadata: Metadata | None) -> Metadata | None:
    """`metadata` plus the current trace context's headers (the same object when there is none to add)."""
    if _propagate is None:
        return metadata
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())
