"""Nothing a client sends may leak memory: the server stays flat across thousands of good and bad calls.

The session's server runs in a thread of this very process (tests/support/serving.py), so the server's
memory is this process's. The test runs a workload once to warm up (allocator arenas, grpc's and ONNX
Runtime's buffers, lazily built caches and code paths reach their steady size), measures, runs the workload
again (larger), and measures again. The workload: good and bad Predict calls of every kind the server must
refuse (each with its expected status), undecodable bodies, calls cancelled by the client or cut by a tiny
deadline, and streams of good and bad frames, half of them cancelled midway.

Three measures, each with a bound chosen to be honest:

- RSS (VmRSS from /proc/self/status) catches everything, native memory included, but moves by a few MiB
  between identical rounds for reasons that are not leaks (malloc keeping freed memory, arena placement
  across grpc's and ONNX Runtime's threads; about 0.1 to 3 MiB measured). Each call carries about 16 KiB of
  tensor data and the bound is 12 MiB over about 4000 calls: anything that keeps a request's or a response's
  payload alive (its bytes, its decoded arrays, a future, task or exception holding them) grows RSS by about
  60 MiB and fails; so does any per-call leak of about 3 KiB or more of anything else.
- The number of objects the garbage collector tracks (containers: dicts, lists, futures, tasks, exceptions,
  frames, class instances) catches the small Python leaks RSS cannot see. It moves by about a hundred
  between identical rounds (work in flight at the moment of counting); the bound, 1500 over about 4000 calls,
  fails a leak of one such object per three calls.
- The server loop's asyncio tasks must come back to their number before the round (waited for, not timed):
  a handler, reader or batcher task left behind by a cancelled call or stream would stay forever.

Not covered: leaks of a few hundred bytes per call in native code, below RSS's noise.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from tensorgate.client.tensors import to_tensor
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc, tensor_pb2
from tests.support.serving import ServerThread

STATUS = Path("/proc/self/status")
MiB = 1024 * 1024
RSS_BOUND = 12 * MiB  # see the module docstring for these numbers
OBJECT_BOUND = 1500
WARMUP_CALLS = 1000  # good calls in the warm-up round, and as many bad ones
CALLS = 2000  # good calls in the measured round, and as many bad ones
STREAMS = 40  # streams per round, 20 frames each (half bad); every other one cancelled after its first result
WINDOW = 32  # calls in flight at once
CALL_TIMEOUT = 60.0  # only a hang gets near it
SETTLE_TIMEOUT = 60.0  # how long the server gets to finish the tasks of calls the client already gave up

ROWS = 64  # digits' max_batch_size: 64 x 1 x 8 x 8 FP32 is 16 KiB
RNG = np.random.default_rng(7)
IMAGE = RNG.uniform(0, 16, (ROWS, 1, 8, 8)).astype(np.float32)
A = RNG.uniform(-8, 8, (ROWS, 4)).astype(np.float32)
PAD = RNG.bytes(16 * 1024)  # ballast: a bad call carries as much as a good one

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def _predict(model: str, *inputs: tensor_pb2.Tensor, **fields: Any) -> predict_pb2.PredictRequest:
    return predict_pb2.PredictRequest(model=model, inputs=inputs, **fields)


def _tensor(name: str, dtype: int, shape: list[int], raw: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=name, dtype=tensor_pb2.DataType.ValueType(dtype), shape=shape, raw=raw)


@dataclass(frozen=True)
class Call:
    """One call of the workload and the statuses it may end with."""

    message: predict_pb2.PredictRequest | bytes  # bytes go out as they are (an undecodable body)
    expected: frozenset[grpc.StatusCode]
    timeout: float = CALL_TIMEOUT
    cancel: bool = False  # cancelled by the client as soon as it is started


def _call(message: predict_pb2.PredictRequest | bytes, *codes: grpc.StatusCode, **options: Any) -> Call:
    return Call(message, frozenset(codes), **options)


_DIGITS = _predict("digits", to_tensor("image", IMAGE))
GOOD = [
    _call(_DIGITS, OK),
    _call(_predict("digits", to_tensor("image", IMAGE[:5]), outputs=["label"], request_id="id-1"), OK),
    _call(_predict("add_sub", to_tensor("a", A), to_tensor("b", A)), OK),
]
BAD = [
    _call(_predict("no_such_model", to_tensor("image", IMAGE)), NOT_FOUND),
    _call(_predict("digits", to_tensor("image", IMAGE), version=2), NOT_FOUND),
    _call(_predict("digits", to_tensor("image", IMAGE.astype(np.float64)[:32])), INVALID),
    _call(_predict("digits", to_tensor("image", IMAGE.reshape(ROWS, 8, 8))), INVALID),
    _call(_predict("digits", _tensor("image", tensor_pb2.DATA_TYPE_FP32, [ROWS, 1, 8, 8], PAD[:-1])), INVALID),
    _call(_predict("digits", to_tensor("image", np.concatenate([IMAGE, IMAGE[:1]]))), INVALID),  # 65 rows
    _call(_predict("digits", to_tensor("image", IMAGE), to_tensor("extra", IMAGE)), INVALID),
    _call(_predict("digits", to_tensor("image", IMAGE), to_tensor("image", IMAGE)), INVALID),
    _call(_predict("digits", to_tensor("image", IMAGE), outputs=["nope"]), INVALID),
    _call(_predict("digits", to_tensor("image", IMAGE), priority=7), INVALID),
    _call(_predict("add_sub", to_tensor("a", A), to_tensor("b", A[:3]), request_id="x" * 1000), INVALID),
    _call(_predict("add_sub", _tensor("a", tensor_pb2.DATA_TYPE_BYTES, [2**40], PAD)), INVALID),
    _call(_predict("add_sub", _tensor("a", 99, [4, 4], PAD)), INVALID),
    _call(b"\xff" + PAD, grpc.StatusCode.INVALID_ARGUMENT),  # undecodable
    _call(_DIGITS, OK, grpc.StatusCode.CANCELLED, cancel=True),
    _call(_DIGITS, OK, grpc.StatusCode.DEADLINE_EXCEEDED, timeout=0.001),
]


@dataclass
class Clients:
    predict: predict_pb2_grpc.PredictStub
    stream: stream_pb2_grpc.StreamStub
    raw_predict: grpc.UnaryUnaryMultiCallable[bytes, bytes]


@pytest.fixture(scope="module")
def clients(served: ServerThread) -> Iterator[Clients]:
    with grpc.insecure_channel(served.address) as channel:
        yield Clients(
            predict_pb2_grpc.PredictStub(channel),
            stream_pb2_grpc.StreamStub(channel),
            channel.unary_unary("/tensorgate.v1.Predict/Predict", request_serializer=None, response_deserializer=None),
        )


def _start(clients: Clients, call: Call) -> grpc.Future[Any]:
    if isinstance(call.message, bytes):
        future: grpc.Future[Any] = clients.raw_predict.future(call.message, timeout=call.timeout)
    else:
        future = clients.predict.Predict.future(call.message, timeout=call.timeout)
    if call.cancel:
        future.cancel()
    return future


def _finish(future: grpc.Future[Any], call: Call) -> None:
    if not future.cancelled():
        future.exception()  # waits for the end
    status = cast(grpc.Call, future)  # a unary future is also the call
    code = status.code()
    assert code in call.expected, f"{code.name}: {status.details()}, expected {sorted(c.name for c in call.expected)}"


def _unary(clients: Clients, calls: int) -> None:
    """`calls` good and `calls` bad calls, interleaved, at most WINDOW in flight."""
    good, bad = itertools.cycle(GOOD), itertools.cycle(BAD)
    in_flight: deque[tuple[grpc.Future[Any], Call]] = deque()
    for call in itertools.chain.from_iterable(zip(itertools.islice(good, calls), bad, strict=False)):
        if len(in_flight) >= WINDOW:
            _finish(*in_flight.popleft())
        in_flight.append((_start(clients, call), call))
    while in_flight:
        _finish(*in_flight.popleft())


def _streams(clients: Clients) -> None:
    """STREAMS streams of good and bad frames; every other one is cancelled after its first result."""
    good = stream_pb2.Frame(inputs=[to_tensor("image", IMAGE[:8])])
    bad = stream_pb2.Frame(inputs=[to_tensor("image", IMAGE.astype(np.float64)[:32])])
    sequences = list(range(1, 21))
    for index in range(STREAMS):
        messages = [stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="digits"))]
        for sequence in sequences:
            frame = stream_pb2.Frame()
            frame.CopyFrom(good if sequence % 2 else bad)
            frame.sequence = sequence
            messages.append(stream_pb2.StreamRequest(frame=frame))
        call = clients.stream.Stream(iter(messages), timeout=CALL_TIMEOUT)
        if index % 2:
            for _ in call:
                cast("grpc.Future[Any]", call).cancel()
                break
            continue
        # The default drop policy (latest) may drop frames: those answered are in order, the rest counted.
        results = list(call)
        answered = [r.sequence for r in results]
        assert answered == sorted(set(answered))
        assert set(answered) <= set(sequences)
        assert len(results) + sum(r.dropped for r in results) == len(sequences)
        assert [r.HasField("error") for r in results] == [s % 2 == 0 for s in answered]


def _round(clients: Clients, calls: int) -> None:
    _unary(clients, calls)
    _streams(clients)


async def _count_tasks() -> int:
    return len(asyncio.all_tasks())


def _settled_tasks(served: ServerThread, baseline: int) -> int:
    """The server loop's task count once it is back to `baseline`, or what it is after SETTLE_TIMEOUT."""
    give_up = time.monotonic() + SETTLE_TIMEOUT
    while (count := int(served.call(_count_tasks()))) > baseline and time.monotonic() < give_up:
        time.sleep(0.05)
    return count


def _rss() -> int:
    """This process's resident set size in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in {STATUS}")


def _measure(served: ServerThread, tasks: int) -> tuple[int, int, int]:
    """(task count once settled, tracked objects, RSS), after a full collection."""
    settled = _settled_tasks(served, tasks)
    gc.collect()
    return settled, len(gc.get_objects()), _rss()


@pytest.mark.skipif(not STATUS.exists(), reason="reads VmRSS from /proc (Linux)")
def test_thousands_of_good_and_bad_calls_do_not_grow_memory(served: ServerThread, clients: Clients) -> None:
    idle_tasks = int(served.call(_count_tasks()))
    _round(clients, WARMUP_CALLS)
    tasks_before, objects_before, rss_before = _measure(served, idle_tasks)
    _round(clients, CALLS)
    tasks_after, objects_after, rss_after = _measure(served, tasks_before)
    what = f"over {2 * CALLS} calls and {STREAMS} streams"
    assert tasks_before <= idle_tasks, f"{tasks_before - idle_tasks} server tasks left after the warm-up"
    assert tasks_after <= tasks_before, f"{tasks_after - tasks_before} server tasks left {what}"
    assert objects_after - objects_before < OBJECT_BOUND, f"{objects_after - objects_before} more objects {what}"
    assert rss_after - rss_before < RSS_BOUND, f"RSS grew {(rss_after - rss_before) / MiB:.1f} MiB {what}"
