"""Structured logs from the real server: every line of a request carries its trace id, span id and request id; the
access log is off by default; and `tensorgate serve` wires the flags (JSON logs, access log, tracing, metrics)."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tensorgate.client import Client
from tensorgate.client.tensors import to_tensor
from tensorgate.server.inference import InferenceService
from tensorgate.server.settings import ServerSettings
from tensorgate.server.telemetry.logging import ACCESS_LOGGER, build_handler
from tensorgate.v1 import predict_pb2, predict_pb2_grpc
from tests.support.serving import EXAMPLE_MODELS, ServerThread
from tests.support.telemetry import spans_named, telemetry_server, wait_for


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """JSON log lines of every `tensorgate.*` logger (the access log included) at INFO and above."""
    stream = io.StringIO()
    handler = build_handler("json", stream)
    logger = logging.getLogger("tensorgate")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def _predict(request_id: str) -> predict_pb2.PredictRequest:
    image = to_tensor("image", np.zeros((1, 1, 8, 8), np.float32))
    return predict_pb2.PredictRequest(model="digits", inputs=[image], request_id=request_id)


def test_every_line_of_a_request_carries_its_trace_span_and_request_ids(
    captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = InferenceService.run

    async def run_and_log(self: InferenceService, *args: Any, **kwargs: Any) -> Any:
        logging.getLogger("tensorgate.test").warning("inside the request")
        return await run(self, *args, **kwargs)

    monkeypatch.setattr(InferenceService, "run", run_and_log)
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    with telemetry_server(EXAMPLE_MODELS, tracing=True, access_log=True) as (server, exporter):
        with grpc.insecure_channel(server.address) as channel:
            predict_pb2_grpc.PredictStub(channel).Predict(
                _predict("log-1"), metadata=(("traceparent", traceparent),), timeout=30
            )
        span = _span(exporter, "log-1")
    assert span.context is not None
    span_id = format(span.context.span_id, "016x")

    lines = [line for line in _lines(captured) if line.get("request_id") == "log-1"]
    assert {line["logger"] for line in lines} == {"tensorgate.test", ACCESS_LOGGER}
    for line in lines:
        assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)
    (access,) = [line for line in lines if line["logger"] == ACCESS_LOGGER]
    assert access["rpc"] == "tensorgate.v1.Predict/Predict"
    assert access["code"] == "OK"
    assert (access["model"], access["version"]) == ("digits", "1")
    assert access["level"] == "INFO"
    assert access["duration_ms"] >= 0


def test_the_access_log_is_off_by_default(served: ServerThread, captured: io.StringIO) -> None:
    assert ServerSettings().access_log is False
    with Client(served.address) as client:
        client.predict("digits", {"image": np.zeros((1, 1, 8, 8), np.float32)}, request_id="quiet-1")
    assert not [line for line in _lines(captured) if line["logger"] == ACCESS_LOGGER]


def _span(exporter: InMemorySpanExporter, request_id: str) -> Any:
    return wait_for(
        lambda: next(
            (
                s
                for s in spans_named(exporter, "tensorgate.v1.Predict/Predict")
                if (s.attributes or {}).get("tensorgate.request_id") == request_id
            ),
            None,
        ),
        what=f"the span of {request_id}",
    )


def _read_banner(process: subprocess.Popen[str]) -> list[str]:
    """stdout up to and including the `metrics on` line (the banner's last line here)."""
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line.rstrip())
        if "metrics on http://" in line:
            return lines
    raise AssertionError(f"the server stopped before its banner was complete: {lines}")


def test_serve_with_json_logs_access_log_tracing_and_metrics(tmp_path: Path) -> None:
    program = Path(sys.executable).with_name("tensorgate")
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "tensorgate-test"}
    command = [
        str(program),
        "serve",
        "--address",
        "127.0.0.1:0",
        "--repository",
        str(EXAMPLE_MODELS),
        "--metrics-address",
        "127.0.0.1:0",
        "--tracing",  # a bare boolean flag means true
        "--log-format",
        "json",
        "--access-log",
        "yes",
    ]
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        try:
            banner = _read_banner(process)
            address = banner[0].rsplit(" ", 1)[1]
            metrics = banner[-1].split("http://", 1)[1].removesuffix("/metrics")
            assert any(line.strip().startswith("tracing: parent-based") for line in banner)
            trace_id = secrets.token_hex(16)
            with grpc.insecure_channel(address) as channel:
                predict_pb2_grpc.PredictStub(channel).Predict(
                    _predict("cli-1"),
                    metadata=(("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),),
                    timeout=30,
                )
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
                scraped = response.read().decode()
            labels = 'code="OK",model="digits",rpc="tensorgate.v1.Predict/Predict",version="1"'
            assert f"tensorgate_requests_total{{{labels}}} 1.0" in scraped
            process.send_signal(signal.SIGTERM)
            stdout, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.strip()]
    (access,) = [line for line in lines if line["logger"] == ACCESS_LOGGER]
    assert (access["request_id"], access["trace_id"], access["code"]) == ("cli-1", trace_id, "OK")
    # The console exporter printed the spans (flushed at shutdown) under the service name from OTEL_SERVICE_NAME.
    assert f'"trace_id": "0x{trace_id}"' in stdout
    assert '"service.name": "tensorgate-test"' in stdout
