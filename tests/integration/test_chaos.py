"""Engines that fail: each fault fails only its own batch, and the server goes on serving everything else.

The chaos engines (tests/support/chaos_engines.py) misbehave only on batches that hold a poison row, so every
test sends a poisoned request, checks its status and message, then shows that a good request to the same model
and a request to another model (the ONNX Runtime `add_sub`) still succeed.

- An engine that raises, or returns outputs that do not match what it declares (rows, dtype, inner shape, a
  missing or an undeclared output, not an array, not a mapping): INTERNAL, with the request id and a message
  naming the output and what was expected. Before `tensorgate.server.batching.checks`, a wrong dtype, a wrong
  inner shape and an undeclared output reached the caller as a silent wrong answer, and a missing output was
  either silently left out or, when requested by name, a KeyError logged as a server bug.
- An engine that hangs: the caller gets DEADLINE_EXCEEDED at its deadline. The hung instance stays busy until
  its engine call returns (an engine call cannot be interrupted: it may be native code on a thread), so the
  batcher gives it no new batch; the model's other instances and the other models keep serving. With every
  instance hung, queued requests expire at their deadlines and the bounded queue refuses the excess with
  RESOURCE_EXHAUSTED; once the engine returns, the model serves again. No batch timeout is added: it could not
  free the instance, only fail callers early, which their own deadlines already do.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from tensorgate.client import Client
from tensorgate.client.errors import TensorgateClientError
from tensorgate.engines import EngineError, TensorSpec
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.batching import Batcher
from tensorgate.server.batching.checks import check_outputs
from tensorgate.server.settings import ServerSettings
from tests.support.chaos_engines import (
    HANG_LIMIT,
    ChaosEngine,
    add_chaos_model,
    good_rows,
    poison_rows,
    reset_chaos,
)
from tests.support.serving import ServerThread, copy_models, running_server

TIMEOUT = 30.0  # only a hang gets near it
HANG_DEADLINE = 3.0  # the deadline of calls that hang: long enough to reach the engine on a busy machine

#: Each fault that fails a batch, and words its message must hold (besides the request id).
FAULT_WORDS: dict[str, list[str]] = {
    "raise": ["RuntimeError: chaos: the engine blew up"],
    "engine_error": ["EngineError: chaos: the device fell over"],
    "rows": ["output 'y'", "1 rows", "the batch has 2 rows"],
    "dtype": ["output 'y'", "dtype FP64", "expected FP32"],
    "dims": ["output 'y'", "shape [2, 3]", "expected [-1, 2]"],
    "missing": ["output 's' is missing", "returned: 'y'"],
    "extra": ["output 'debug'", "not one the model declares"],
    "not_array": ["output 'y'", "list, not a numpy array"],
    "not_mapping": ["returned NoneType, not a mapping"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = copy_models(tmp_path_factory.mktemp("chaos"), "add_sub")
    for fault in FAULT_WORDS:
        add_chaos_model(repository, f"chaos_{fault}", fault)
    add_chaos_model(repository, "hang_two", "hang", instances=2)
    add_chaos_model(repository, "hang_one", "hang", queue=4)
    reset_chaos()
    try:
        with running_server(repository) as thread:
            yield thread
    finally:
        ChaosEngine.release.set()  # a failed test must not leave a batch hanging into the teardown


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture
def oip(server: ServerThread) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _oip_request(model: str, x: npt.NDArray[np.float32], request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def _oip_outputs(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    return {
        tensor.name: np.frombuffer(raw, "<f4").reshape(tensor.shape)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _failure(call: Callable[[], object]) -> TensorgateClientError:
    with pytest.raises(TensorgateClientError) as caught:
        call()
    return caught.value


def _rpc_failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def _assert_correct(outputs: Mapping[str, npt.NDArray[Any]], x: npt.NDArray[np.float32]) -> None:
    np.testing.assert_array_equal(outputs["y"], x * 2)
    np.testing.assert_array_equal(outputs["s"], x.sum(axis=1, keepdims=True))


def _assert_others_serve(client: Client, model: str) -> None:
    """A good request to `model` and one to another model both succeed."""
    x = good_rows(2)
    _assert_correct(client.predict(model, {"x": x}), x)
    a = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(client.predict("add_sub", {"a": a, "b": a})["sum"], a * 2)


def _batcher(server: ServerThread, model: str) -> Batcher:
    async def find() -> Batcher:
        batcher = server.server.repository.resolve(model).batcher
        assert batcher is not None
        return batcher

    found: Batcher = server.call(find())
    return found


def _gauges(server: ServerThread, model: str) -> tuple[int, int]:
    """(queue depth, requests in running batches) of the model's batcher, read on the server's loop."""
    batcher = _batcher(server, model)

    async def read() -> tuple[int, int]:
        return batcher.queue_depth, batcher.in_flight

    gauges: tuple[int, int] = server.call(read())
    return gauges


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll the server's state until `condition` holds; fail after `timeout` seconds (a bound, not a timing)."""
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# -- faults that fail a batch --------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", sorted(FAULT_WORDS))
def test_a_failing_or_misshapen_engine_fails_only_its_own_batch(
    client: Client, oip: pb_grpc.GRPCInferenceServiceStub, fault: str
) -> None:
    model = f"chaos_{fault}"
    for outputs in (None, ["s"]):  # asking for one output by name must not change the outcome
        call = functools.partial(client.predict, model, {"x": poison_rows(2)}, outputs=outputs, request_id="v1-7")
        error = _failure(call)
        assert error.code == grpc.StatusCode.INTERNAL, error
        for words in [f"model {model}: the engine failed", "(request id v1-7)", *FAULT_WORDS[fault]]:
            assert words in error.details, error.details

    rpc = _rpc_failure(lambda: oip.ModelInfer(_oip_request(model, poison_rows(2), "oip-9"), timeout=TIMEOUT))
    assert rpc.code() == grpc.StatusCode.INTERNAL
    assert "(request id oip-9)" in (rpc.details() or "")
    assert FAULT_WORDS[fault][0] in (rpc.details() or "")

    # The same model's next batch, and the other models, are served as if nothing had happened.
    _assert_others_serve(client, model)
    x = good_rows(3)
    _assert_correct(_oip_outputs(oip.ModelInfer(_oip_request(model, x), timeout=TIMEOUT)), x)


def test_a_failing_frame_gets_internal_and_its_stream_goes_on(
    client: Client, oip: pb_grpc.GRPCInferenceServiceStub
) -> None:
    frames = [{"x": good_rows(1)}, {"x": poison_rows(1)}, {"x": good_rows(1, 5.0)}]
    results = list(client.stream("chaos_dtype", frames, policy="block"))
    assert [(result.sequence, result.ok) for result in results] == [(0, True), (1, False), (2, True)]
    error = results[1].error
    assert error is not None
    assert error.code == "INTERNAL"
    for words in ["(request id ", *FAULT_WORDS["dtype"]]:
        assert words in error.message
    _assert_correct(results[2].outputs, good_rows(1, 5.0))

    frames_x = [frame["x"] for frame in frames]
    requests = [_oip_request("chaos_raise", x, f"s-{i}") for i, x in enumerate(frames_x)]
    responses = list(oip.ModelStreamInfer(iter(requests), timeout=TIMEOUT))
    assert [(r.infer_response.id, bool(r.error_message)) for r in responses] == [
        ("s-0", False),
        ("s-1", True),
        ("s-2", False),
    ]
    assert "(request id s-1)" in responses[1].error_message
    assert "chaos: the engine blew up" in responses[1].error_message
    _assert_correct(_oip_outputs(responses[2].infer_response), frames_x[2])


# -- hangs ---------------------------------------------------------------------------------------------------


def test_a_hung_instance_leaves_the_other_instance_and_models_serving(
    server: ServerThread, client: Client, chaos: type[ChaosEngine]
) -> None:
    error = _failure(lambda: client.predict("hang_two", {"x": poison_rows(1)}, timeout=HANG_DEADLINE))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert chaos.hung.wait(TIMEOUT)
    # The caller is gone, but its batch is still in the engine: the instance stays busy, and counted so.
    assert _gauges(server, "hang_two") == (0, 1)

    for _ in range(4):
        _assert_others_serve(client, "hang_two")
    served = {instance for model, instance, _ in chaos.batches if model == "hang_two"}
    assert len(served) == 1, f"good batches ran on instances {served}: one of the two is hung"

    chaos.release.set()
    _wait_until(lambda: _gauges(server, "hang_two") == (0, 0), "the hung batch to finish")
    hung_on = {instance for model, instance, rows in chaos.batches if model == "hang_two"} - served
    assert len(hung_on) == 1, "the hung batch ran on the other instance"
    _assert_others_serve(client, "hang_two")


def test_with_every_instance_hung_the_queue_stays_bounded_and_recovers(
    server: ServerThread, client: Client, chaos: type[ChaosEngine]
) -> None:
    pool = futures.ThreadPoolExecutor(8)
    try:
        hung = pool.submit(client.predict, "hang_one", {"x": poison_rows(1)}, timeout=HANG_DEADLINE)
        assert chaos.hung.wait(TIMEOUT)

        # Queued behind the hung batch: a request with a deadline gets DEADLINE_EXCEEDED, and leaves the queue.
        error = _failure(lambda: client.predict("hang_one", {"x": good_rows(1)}, timeout=0.5))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED, error
        _wait_until(lambda: _gauges(server, "hang_one") == (0, 1), "the expired request to leave the queue")

        # Requests without a deadline wait, up to the queue's bound (4); the next one is refused at once.
        waiting = [pool.submit(client.predict, "hang_one", {"x": good_rows(1, i)}, timeout=None) for i in range(4)]
        _wait_until(lambda: _gauges(server, "hang_one")[0] == 4, "four queued requests")
        error = _failure(lambda: client.predict("hang_one", {"x": good_rows(1)}))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        _assert_others_serve(client, "hang_two")

        hung_error = hung.exception(timeout=TIMEOUT)
        assert isinstance(hung_error, TensorgateClientError)
        assert hung_error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not any(future.done() for future in waiting)

        chaos.release.set()  # the engine comes back: what waited is served, in order
        for i, future in enumerate(waiting):
            _assert_correct(future.result(timeout=TIMEOUT), good_rows(1, i))
        _wait_until(lambda: _gauges(server, "hang_one") == (0, 0), "the batcher to go idle")
        _assert_others_serve(client, "hang_one")
    finally:
        chaos.release.set()
        pool.shutdown(wait=True)


# -- the output checks themselves (no server) ----------------------------------------------------------------

Y = TensorSpec("y", np.dtype(np.float32), (-1, 2))
TEXT = TensorSpec("t", np.dtype(np.object_), (-1,))


@pytest.mark.parametrize(
    "outputs",
    [
        {"y": np.zeros((3, 2), ">f4"), "t": np.array([b"a"], object)},  # byte order is the encoder's business
        {"y": np.zeros((0, 2), np.float32), "t": np.array(["a", "b"])},  # str arrays are BYTES too
        {"y": np.zeros((1, 2), np.float32), "t": np.array([b"a"])},
    ],
)
def test_outputs_that_match_pass_unchanged(outputs: dict[str, npt.NDArray[Any]]) -> None:
    assert check_outputs([Y, TEXT], outputs) is outputs


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        ({"y": np.zeros((3, 2), np.int32), "t": np.array([b"a"])}, "output 'y' has dtype INT32, expected FP32"),
        ({"y": np.zeros((3, 2), np.float32), "t": np.zeros(1, np.float32)}, "output 't' has dtype FP32"),
        ({"y": np.zeros(6, np.float32), "t": np.array([b"a"])}, "output 'y' has shape [6], expected [-1, 2]"),
        ({"y": np.zeros((3, 2), np.float32)}, "output 't' is missing"),
        ({"y": np.zeros((3, 2), np.complex64), "t": np.array([b"a"])}, "dtype complex64, expected FP32"),
    ],
)
def test_outputs_that_do_not_match_name_the_output(outputs: dict[str, npt.NDArray[Any]], words: str) -> None:
    with pytest.raises(EngineError) as caught:
        check_outputs([Y, TEXT], outputs)
    assert words in str(caught.value)


def test_a_hung_engine_does_not_hold_shutdown_past_the_grace_period(tmp_path: Path) -> None:
    # gRPC ends the hung call at the grace period; the batch still running in the engine must not keep
    # Server.stop from returning (it would block a pod's termination until SIGKILL).
    repository = tmp_path / "repo"
    add_chaos_model(repository, "hang_alone", "hang")
    reset_chaos()
    thread = ServerThread(ServerSettings(address="127.0.0.1:0", repository=repository, grace_period=0.2))
    thread.start()
    pool = futures.ThreadPoolExecutor(1)
    try:
        with Client(thread.address) as client:
            hung = pool.submit(client.predict, "hang_alone", {"x": poison_rows(1)}, timeout=None)
            assert ChaosEngine.hung.wait(TIMEOUT), "the poisoned batch never reached the engine"
            stopping = threading.Thread(target=thread.stop)
            stopping.start()
            stopping.join(timeout=HANG_LIMIT / 3)  # the hung batch gives up only at HANG_LIMIT
            assert not stopping.is_alive(), "Server.stop waited for a hung engine"
            error = hung.exception(timeout=TIMEOUT)
            assert isinstance(error, TensorgateClientError)
            assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        ChaosEngine.release.set()
        pool.shutdown(wait=True)
