"""The Python client carries the caller's OpenTelemetry trace into the server (sync and async clients)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer

from tensorgate.client import AsyncClient, Client, _tracing
from tests.support.serving import EXAMPLE_MODELS, ServerThread
from tests.support.telemetry import spans_named, telemetry_server, wait_for

PREDICT = "tensorgate.v1.Predict/Predict"


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[ServerThread, InMemorySpanExporter]]:
    with telemetry_server(EXAMPLE_MODELS, tracing=True, trace_sample_ratio=1.0) as served:
        yield served


@pytest.fixture
def caller() -> Tracer:
    """The calling application's tracer: its own SDK provider, as an application would configure one."""
    return TracerProvider().get_tracer("caller")


def _inputs() -> dict[str, np.ndarray]:
    return {"image": np.zeros((1, 1, 8, 8), np.float32)}


def _span_of(exporter: InMemorySpanExporter, request_id: str) -> ReadableSpan:
    def find() -> ReadableSpan | None:
        for span in spans_named(exporter, PREDICT):
            if (span.attributes or {}).get("tensorgate.request_id") == request_id:
                return span
        return None

    return wait_for(find, what=f"the span of {request_id}")


def test_the_sync_client_continues_the_current_trace(
    traced: tuple[ServerThread, InMemorySpanExporter], caller: Tracer
) -> None:
    server, exporter = traced
    assert _tracing.available()
    with caller.start_as_current_span("checkout") as parent, Client(server.address) as client:
        client.predict("digits", _inputs(), request_id="client-sync")
    span = _span_of(exporter, "client-sync")
    assert span.context is not None
    assert span.parent is not None
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent.span_id == parent.get_span_context().span_id


async def test_the_async_client_continues_the_current_trace(
    traced: tuple[ServerThread, InMemorySpanExporter], caller: Tracer
) -> None:
    server, exporter = traced
    with caller.start_as_current_span("checkout-async") as parent:
        async with AsyncClient(server.address) as client:
            await client.predict("digits", _inputs(), request_id="client-async")
    span = _span_of(exporter, "client-async")
    assert span.context is not None
    assert span.parent is not None
    assert span.context.trace_id == parent.get_span_context().trace_id
    assert span.parent.span_id == parent.get_span_context().span_id


def test_outside_any_span_the_server_starts_a_trace(traced: tuple[ServerThread, InMemorySpanExporter]) -> None:
    server, exporter = traced
    with Client(server.address, metadata=[("x-caller", "test")]) as client:
        client.predict("digits", _inputs(), request_id="client-root")
    span = _span_of(exporter, "client-root")
    assert span.parent is None
