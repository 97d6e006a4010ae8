"""`Telemetry`: what the server's settings turn on, wired into the server, and what a scrape or a trace needs.

Everything is optional. With tracing, metrics and the access log all off (the default), nothing is installed:
no interceptor, no probe, no wrapped batch runner, so telemetry costs nothing. Tracing needs `opentelemetry-sdk`,
metrics `prometheus-client` (both in the `observability` extra); when one is asked for but not installed, the
server says so in one log line and serves without it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tensorgate.server.repository import Repository
from tensorgate.server.settings import ServerSettings
from tensorgate.server.telemetry.context import _scope
from tensorgate.server.telemetry.instrument import BatchTelemetry, RequestProbe, TracedCount
from tensorgate.server.telemetry.interceptor import TelemetryInterceptor

if TYPE_CHECKING:
    from tensorgate.server.telemetry.metrics import Metrics
    from tensorgate.server.telemetry.tracing import Tracing

__all__ = ["INSTALL_HINT", "Telemetry", "count_dropped_frames"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'tensorgate[observability]'"


def count_dropped_frames(model: str, count: int = 1) -> None:
    """Count `count` frames of `model` that a stream's drop policy discarded (`tensorgate_stream_frames_dropped_total`).

    Call it from the stream's handler or from tasks it started (they carry the call's context); elsewhere, or with
    metrics off, it does nothing.
    """
    scope = _scope.get()
    if scope is not None and scope.metrics is not None and count > 0:
        scope.metrics.count_dropped_frames(model, count)


def _disabled(environ: Mapping[str, str]) -> bool:
    return environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


class Telemetry:
    """The server's tracing, metrics and access log, as its settings ask (see the module docstring).

    Raises ValueError for settings or OTEL_* variables that make no sense (an unknown exporter, a ratio outside
    0..1), so the server refuses to start rather than run without what was asked for.
    """

    def __init__(self, settings: ServerSettings, *, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.settings = settings
        self.tracing: Tracing | None = None
        self.metrics: Metrics | None = None
        self.access_log = settings.access_log
        #: Lines for the startup banner: what is on, and why something asked for is off.
        self.notes: list[str] = []
        for name in ("trace_sample_ratio", "trace_frame_ratio"):
            value = getattr(settings, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"setting {name!r} must be within 0..1, got {value}")
        if settings.tracing:
            if _disabled(env):
                self._off("tracing is off: OTEL_SDK_DISABLED=true")
            else:
                try:
                    from tensorgate.server.telemetry.tracing import Tracing
                except ImportError as exc:
                    self._off(f"tracing is off: {exc.name} is not installed ({INSTALL_HINT})")
                else:
                    try:
                        self.tracing = Tracing(
                            sample_ratio=settings.trace_sample_ratio,
                            frame_ratio=settings.trace_frame_ratio,
                            environ=env,
                        )
                    except ImportError as exc:
                        raise ValueError(f"the trace exporter needs {exc.name} ({INSTALL_HINT})") from exc
        if settings.metrics_address:
            try:
                from tensorgate.server.telemetry.metrics import Metrics
            except ImportError as exc:
                self._off(f"metrics are off: {exc.name} is not installed ({INSTALL_HINT})")
            else:
                self.metrics = Metrics()
        tracing, metrics = self.tracing, self.metrics
        measured = tracing is not None or metrics is not None
        #: For `InferenceService` and `Repository`; None when there is nothing to record.
        traced = TracedCount()
        self.probe = RequestProbe(tracing, metrics, traced) if measured else None
        self.instrumentation = BatchTelemetry(tracing, metrics, traced) if measured else None
        self._stopped = False

    def _off(self, why: str) -> None:
        log.warning("%s", why)
        self.notes.append(why)

    @property
    def enabled(self) -> bool:
        """Whether anything is recorded at all."""
        return self.tracing is not None or self.metrics is not None or self.access_log

    def interceptor(self, repository: Repository) -> TelemetryInterceptor | None:
        """The server interceptor, or None when nothing is recorded per call."""
        if not self.enabled:
            return None
        return TelemetryInterceptor(repository, tracing=self.tracing, metrics=self.metrics, access_log=self.access_log)

    def start(self, repository: Repository, host: str, port: int) -> None:
        """Bind the metrics endpoint and note the server's address. OSError when the metrics port is taken."""
        if self.tracing is not None:
            self.tracing.set_server_address(host, port)
            self.notes.append(self.tracing.describe())
        if self.metrics is not None:
            self.metrics.watch(repository)
            address = self.metrics.serve(self.settings.metrics_address)
            self.notes.append(f"metrics on http://{address}/metrics")

    @property
    def metrics_address(self) -> str:
        """HOST:PORT of the bound metrics endpoint ("" when metrics are off)."""
        return self.metrics.address if self.metrics is not None else ""

    def stop(self) -> None:
        """Close the metrics endpoint and export the spans still buffered. Safe to call again."""
        if self._stopped:
            return
        self._stopped = True
        if self.metrics is not None:
            self.metrics.close()
        if self.tracing is not None:
            self.tracing.shutdown()
