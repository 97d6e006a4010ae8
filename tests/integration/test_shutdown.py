"""SIGTERM drains: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight calls finish, exit 0."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc
from tests.support.serving import EXAMPLE_MODELS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _start(repository: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorgate.server.cli", "--address", "127.0.0.1:0", "--grace-period", "30"],
        env={
            **os.environ,
            "TENSORGATE_REPOSITORY": str(repository),
        },  # the environment works as well as flags
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("tensorgate listening on "):
            return process, line.split()[-1]
    process.kill()
    pytest.fail(f"the server exited ({process.wait()}) without listening")


def _frame(sequence: int) -> stream_pb2.StreamRequest:
    image = np.full((1, 1, 8, 8), sequence, np.float32)
    return stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=sequence, inputs=[to_tensor("image", image)]))


def test_sigterm_drains_in_flight_calls_and_exits_zero() -> None:
    process, address = _start(EXAMPLE_MODELS)
    try:
        with grpc.insecure_channel(address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="digits"))
            assert next(watch).status == SERVING

            # An in-flight call that provably reached the server: a stream that has had one result back.
            outbox: queue.Queue[stream_pb2.StreamRequest | None] = queue.Queue()

            def requests() -> Iterator[stream_pb2.StreamRequest]:
                yield stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="digits"))
                while (item := outbox.get()) is not None:
                    yield item

            results = iter(stream_pb2_grpc.StreamStub(channel).Stream(requests(), timeout=60))
            outbox.put(_frame(0))
            assert next(results).sequence == 0

            process.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING

            # New calls are refused (retry briefly: NOT_SERVING is published just before the listener stops).
            code = None
            with grpc.insecure_channel(address) as fresh:
                request = predict_pb2.PredictRequest(model="digits", inputs=[_frame(1).frame.inputs[0]])
                for _ in range(50):
                    try:
                        predict_pb2_grpc.PredictStub(fresh).Predict(request, timeout=5)
                    except grpc.RpcError as exc:
                        code = exc.code()
                        break
                    time.sleep(0.1)
            assert code == grpc.StatusCode.UNAVAILABLE

            # The in-flight stream still gets its next result, then ends cleanly.
            outbox.put(_frame(1))
            last = next(results)
            assert last.sequence == 1
            assert from_tensor(next(t for t in last.outputs if t.name == "label")).shape == (1,)
            outbox.put(None)
            assert list(results) == []
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
