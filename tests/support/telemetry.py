"""Helpers for telemetry tests: a real server whose spans land in memory, Prometheus scrapes, bounded waits."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from tensorgate.server.settings import ServerSettings
from tests.support.serving import ServerThread

__all__ = ["Samples", "scrape", "spans_named", "telemetry_server", "wait_for"]

T = TypeVar("T")

#: (metric sample name, sorted label items) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextmanager
def telemetry_server(repository: Path, **settings: Any) -> Iterator[tuple[ServerThread, InMemorySpanExporter]]:
    """A started server over `repository` with `settings`; with tracing on, its spans go to the returned exporter.

    OTEL_TRACES_EXPORTER is "none" while the server is built, so only the in-memory exporter gets spans.
    """
    exporter = InMemorySpanExporter()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_TRACES_EXPORTER", "none")
        thread = ServerThread(ServerSettings(address="127.0.0.1:0", repository=repository, **settings))
    tracing = thread.server.telemetry.tracing
    if tracing is not None:
        tracing.add_span_processor(SimpleSpanProcessor(exporter))
    thread.start()
    try:
        yield thread, exporter
    finally:
        thread.stop()


def wait_for(probe: Callable[[], T | None], *, timeout: float = 10.0, what: str = "the condition") -> T:
    """Poll `probe` until it returns something truthy, and return it; fail after `timeout` seconds.

    A call's status reaches the client before the server's interceptor has recorded it (grpc.aio sends an abort's
    status first), so tests wait for the record to appear instead of reading it at once. Not a timing assertion:
    the bound is only how long to wait before calling it missing.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def scrape(address: str) -> Samples:
    """Every sample of the /metrics endpoint at HOST:PORT."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """The finished spans called `name`."""
    return [span for span in exporter.get_finished_spans() if span.name == name]
