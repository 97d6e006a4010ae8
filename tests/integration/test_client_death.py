"""Clients killed (SIGKILL, no goodbye) in the middle of their calls leave nothing behind on the server.

What the other tests already cover: test_memory.py cancels calls and streams from a live client and checks
that tasks, objects and RSS come back; test_stream_load.py kills streaming clients and checks that their streams
close and the server goes on serving. What they leave out, and this module checks: a client killed while its
unary call (either API) or its stream's frame is *inside the engine*, with more of its calls and frames *queued*
behind it. The model is a chaos engine whose poisoned batch hangs until the test lets it go
(tests/support/chaos_engines.py), so the kill lands at a known point, not at a lucky one.

After the kill, with the engine still hung, the server must: drop the dead client's queued requests from the
batcher (they never cost engine time), close its streams, end its handler tasks, and bring the per-method
in-flight gauge back to zero. Once the engine returns, the in-flight batch gauge comes back to zero too, the
Prometheus gauges agree, and the model serves new calls. Every wait is a bounded poll of the server's state.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tensorgate.client import Client
from tests.support.chaos_engines import ChaosEngine, add_chaos_model, good_rows, reset_chaos
from tests.support.serving import ServerThread, running_server
from tests.support.telemetry import scrape

MODEL = "hold"
SETTLE_TIMEOUT = 30.0  # how long the server gets to notice a dead client; only a leak gets near it

# The child: sends a poisoned call (it hangs in the engine), waits for the go-ahead on stdin so that the poisoned
# batch is surely the one in the engine, queues more behind it, reports, and waits to be killed.
CHILD = """
import sys, threading
import grpc, numpy as np
from tensorgate.client.tensors import to_tensor
from tensorgate.oip import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc

address, mode, model = sys.argv[1:4]
poison = -np.ones((1, 2), np.float32)
good = np.ones((1, 2), np.float32)
channel = grpc.insecure_channel(address)
predict = predict_pb2_grpc.PredictStub(channel)
oip = pb_grpc.GRPCInferenceServiceStub(channel)
go, never = threading.Event(), threading.Event()

def v1(x, request_id):
    return predict_pb2.PredictRequest(model=model, inputs=[to_tensor("x", x)], request_id=request_id)

def infer(x, request_id):
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request

def frames():
    config = stream_pb2.StreamConfig(model=model, drop_policy=stream_pb2.DROP_POLICY_QUEUE, max_in_flight=4)
    yield stream_pb2.StreamRequest(config=config)
    yield stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=0, inputs=[to_tensor("x", poison)]))
    go.wait()
    yield stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=1, inputs=[to_tensor("x", good)]))
    never.wait()

def oip_stream():
    yield infer(good, "dead-stream")
    never.wait()

calls = []
if mode == "unary":
    calls.append(predict.Predict.future(v1(poison, "dead-0")))
else:
    calls.append(stream_pb2_grpc.StreamStub(channel).Stream(frames()))
print("sent", flush=True)
sys.stdin.readline()
go.set()
if mode == "unary":
    calls += [predict.Predict.future(v1(good, f"dead-{i}")) for i in (1, 2)]
    calls += [oip.ModelInfer.future(infer(good, f"dead-{i}")) for i in (3, 4)]
else:
    calls.append(oip.ModelStreamInfer(oip_stream()))
print("queued", flush=True)
never.wait()
"""


@dataclass(frozen=True)
class State:
    """What the server holds for calls: everything here must come back to its idle value."""

    tasks: int  # asyncio tasks on the server's loop (handlers, stream readers and runners)
    streams: int  # open streams of the Stream service
    queued: int  # requests waiting in the model's batcher
    running: int  # requests in the model's running batches
    rpcs: float  # the rpcs-in-flight gauge, summed over methods


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = tmp_path_factory.mktemp("client-death")
    add_chaos_model(repository, MODEL, "hang", queue=16)
    reset_chaos()
    try:
        with running_server(repository, metrics_address="127.0.0.1:0") as thread:
            yield thread
    finally:
        ChaosEngine.release.set()


def _state(server: ServerThread) -> State:
    async def read() -> State:
        batcher = server.server.repository.resolve(MODEL).batcher
        assert batcher is not None
        metrics = server.server.telemetry.metrics
        assert metrics is not None
        return State(
            tasks=len(asyncio.all_tasks()),
            streams=len(server.server.streams),
            queued=batcher.queue_depth,
            running=batcher.in_flight,
            rpcs=sum(count.value for count in metrics.rpcs_in_flight.values()),
        )

    state: State = server.call(read())
    return state


def _settle(server: ServerThread, done: Callable[[State], bool]) -> State:
    """Poll the server's state until `done` holds, or SETTLE_TIMEOUT passes; return the last state."""
    give_up = time.monotonic() + SETTLE_TIMEOUT
    while not done(state := _state(server)) and time.monotonic() < give_up:
        time.sleep(0.02)
    return state


def _run_child(server: ServerThread, mode: str, chaos: type[ChaosEngine], *, queued: int, streams: int) -> None:
    """Start a client in `mode`, wait until its calls are in the engine and the queue as expected, kill it."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.address, mode, MODEL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdin is not None
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "sent", child.stderr.read() if child.stderr else ""
        assert chaos.hung.wait(SETTLE_TIMEOUT), "the poisoned call never reached the engine"
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "queued", child.stderr.read() if child.stderr else ""
        busy = _settle(server, lambda s: s.queued == queued and s.streams == streams)
        assert (busy.queued, busy.running, busy.streams) == (queued, 1, streams), busy
        assert busy.rpcs >= 1, busy
    finally:
        child.send_signal(signal.SIGKILL)  # no goodbye: the connection just dies
        child.communicate(timeout=30)


def _back_to(idle: State, running: int) -> Callable[[State], bool]:
    """Whether a state is `idle` again, but for `running` requests in a running batch. Tasks may end up below the
    idle count (a task of an earlier call may still have been finishing when it was taken), never above."""
    return lambda s: s.tasks <= idle.tasks and (s.streams, s.queued, s.running, s.rpcs) == (0, 0, running, 0)


def _check_recovery(server: ServerThread, chaos: type[ChaosEngine], idle: State) -> None:
    # With the engine still hung: the dead client's queued requests, streams, handler tasks and gauges are gone.
    after_kill = _settle(server, _back_to(idle, 1))
    assert _back_to(idle, 1)(after_kill), f"after the kill: {after_kill}; idle: {idle}"

    chaos.release.set()  # the hung batch finishes, for nobody
    released = _settle(server, _back_to(idle, 0))
    assert _back_to(idle, 0)(released), f"after the release: {released}; idle: {idle}"
    ran = [rows for model, _, rows in chaos.batches if model == MODEL]
    assert ran == [1], f"batches run: {ran}; only the poisoned one may have reached the engine"

    samples = scrape(server.server.telemetry.metrics_address)
    for name in ("tensorgate_queue_depth", "tensorgate_inflight_requests", "tensorgate_rpcs_in_flight"):
        values = [value for (sample, _), value in samples.items() if sample == name]
        assert values, f"no {name} in /metrics"
        assert not any(values), f"{name}: {values}"

    with Client(server.address, timeout=SETTLE_TIMEOUT) as client:
        x = good_rows(2)
        np.testing.assert_array_equal(client.predict(MODEL, {"x": x})["y"], x * 2)
        results = list(client.stream(MODEL, [{"x": x[:1]}, {"x": x[1:]}], policy="block"))
        assert [result.ok for result in results] == [True, True]


def test_a_client_killed_mid_unary_call_leaks_nothing(server: ServerThread, chaos: type[ChaosEngine]) -> None:
    idle = _state(server)
    assert (idle.streams, idle.queued, idle.running, idle.rpcs) == (0, 0, 0, 0)
    # One Predict in the engine; two Predicts and two ModelInfers queued behind it.
    _run_child(server, "unary", chaos, queued=4, streams=0)
    _check_recovery(server, chaos, idle)


def test_a_client_killed_mid_stream_leaks_nothing(server: ServerThread, chaos: type[ChaosEngine]) -> None:
    idle = _state(server)
    assert (idle.streams, idle.queued, idle.running, idle.rpcs) == (0, 0, 0, 0)
    # A Stream with one frame in the engine and one queued; a ModelStreamInfer with one request queued.
    _run_child(server, "stream", chaos, queued=2, streams=1)
    _check_recovery(server, chaos, idle)
