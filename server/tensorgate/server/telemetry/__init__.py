"""Observability: OpenTelemetry traces around every stage, Prometheus metrics, structured logs.

- `Telemetry`: what the server's settings turn on (tracing, metrics, access log), wired into the server.
- `count_dropped_frames`: for stream code, counts frames a drop policy discarded.
- `tensorgate.server.telemetry.logging`: JSON or text log lines carrying trace id, span id and request id.

`tracing` and `metrics` import OpenTelemetry and prometheus_client (the `observability` extra) and are only
imported when turned on; nothing else here needs them.
"""

from __future__ import annotations

from tensorgate.server.telemetry.context import RequestTrace, RpcScope, current_request, current_scope
from tensorgate.server.telemetry.core import INSTALL_HINT, Telemetry, count_dropped_frames

__all__ = [
    "INSTALL_HINT",
    "RequestTrace",
    "RpcScope",
    "Telemetry",
    "count_dropped_frames",
    "current_request",
    "current_scope",
]
