"""Each configurable limit, crossed on the real server, answers its status code and the server goes on serving.

Limits tested elsewhere: `max_message_bytes` (test_predict_errors.py, test_oip.py: RESOURCE_EXHAUSTED) and
`max_streams` (test_stream.py: RESOURCE_EXHAUSTED; its retry hint is checked here).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from tensorgate.client import Client
from tensorgate.client.tensors import to_tensor, to_wire_dtype
from tensorgate.oip import grpc_service_pb2 as oip
from tensorgate.oip import grpc_service_pb2_grpc as oip_grpc
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc, tensor_pb2
from tests.integration.oip_engines import GateEngine, add_gate_model
from tests.support.serving import copy_models, running_server


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """add_sub (a, b: FP32 [-1, 4]; max_batch_size 64) and the gate model, whose batches wait for the test."""
    repo = copy_models(tmp_path / "models", "add_sub")
    add_gate_model(repo)
    return repo


def _add_sub(rows: int = 1) -> predict_pb2.PredictRequest:
    values = np.ones((rows, 4), np.float32)
    return predict_pb2.PredictRequest(model="add_sub", inputs=[to_tensor("a", values), to_tensor("b", values)])


def _oip_add_sub(rows: int = 1) -> oip.ModelInferRequest:
    raw = np.ones((rows, 4), np.float32).tobytes()
    return oip.ModelInferRequest(
        model_name="add_sub",
        inputs=[oip.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[rows, 4]) for name in "ab"],
        raw_input_contents=[raw, raw],
    )


def _gate_request() -> predict_pb2.PredictRequest:
    return predict_pb2.PredictRequest(model="gate", inputs=[to_tensor("x", np.ones((1, 1), np.float32))])


def _error(call: Any, request: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, **kwargs)
    return caught.value


def _held(predict: Any) -> Any:
    """A gate call in flight, its batch held in the engine until `GateEngine.gate` opens."""
    future = predict.future(_gate_request(), timeout=60)
    assert GateEngine.entered.wait(30)
    return future


# -- calls and streams at once --------------------------------------------------------------------------------


def test_max_concurrent_rpcs_refuses_the_excess(repository: Path) -> None:
    with (
        running_server(repository, max_concurrent_rpcs=1) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        try:
            held = _held(predict)
            error = _error(predict, _add_sub(), timeout=30)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            GateEngine.gate.set()
        assert held.result(timeout=30).outputs
        assert predict(_add_sub(), timeout=30).outputs  # the slot is free again


def test_max_streams_per_connection_holds_the_excess_on_the_client(repository: Path) -> None:
    with (
        running_server(repository, max_streams_per_connection=1) as server,
        grpc.insecure_channel(server.address) as channel,
        # Its own connection: channels to one address otherwise share the process's connection.
        grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as other,
    ):
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        try:
            held = _held(predict)
            # The connection's one stream is taken: the call waits on the client and never reaches the server.
            error = _error(predict, _add_sub(), timeout=1.0)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # Another connection is not affected.
            assert predict_pb2_grpc.PredictStub(other).Predict(_add_sub(), timeout=30).outputs
        finally:
            GateEngine.gate.set()
        assert held.result(timeout=30).outputs
        assert predict(_add_sub(), timeout=30).outputs


def test_max_streams_refusal_carries_a_retry_hint(repository: Path) -> None:
    def config() -> stream_pb2.StreamRequest:
        return stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="add_sub"))

    frame = stream_pb2.StreamRequest(
        frame=stream_pb2.Frame(
            inputs=[to_tensor("a", np.ones((1, 4), np.float32)), to_tensor("b", np.ones((1, 4), np.float32))]
        )
    )
    pending: queue.Queue[stream_pb2.StreamRequest | None] = queue.Queue()

    def held_requests() -> Iterator[stream_pb2.StreamRequest]:
        while (message := pending.get(timeout=60)) is not None:
            yield message

    with running_server(repository, max_streams=1) as server, grpc.insecure_channel(server.address) as channel:
        stub = stream_pb2_grpc.StreamStub(channel)
        first = iter(stub.Stream(held_requests(), timeout=60))
        try:
            pending.put(config())
            pending.put(frame)
            assert next(first).outputs  # the stream holds its place now
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Stream(iter([config()]), timeout=30))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = dict(cast(Any, caught.value).trailing_metadata())
            assert int(trailers["grpc-retry-pushback-ms"]) > 0
            assert int(trailers["retry-after"]) >= 1
        finally:
            pending.put(None)
        assert list(first) == []


# -- per request and per frame ----------------------------------------------------------------------------------


def test_max_frame_bytes_fails_that_frame_only(repository: Path) -> None:
    small, big = (
        {"a": np.ones((rows, 4), np.float32), "b": np.ones((rows, 4), np.float32)} for rows in (1, 32)
    )  # about 70 bytes and 1 KiB on the wire
    with running_server(repository, max_frame_bytes=512) as server:
        with Client(server.address) as client:
            results = list(client.stream("add_sub", [small, big, small], policy="block"))
        assert [result.sequence for result in results] == [0, 1, 2]
        assert results[0].ok
        assert results[2].ok
        error = results[1].error
        assert error is not None
        assert error.code == "RESOURCE_EXHAUSTED"
        assert "max_frame_bytes=512" in error.message

        # The Open Inference Protocol's stream: the same limit, per request, and the stream goes on.
        with grpc.insecure_channel(server.address) as channel:
            stream = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
            responses = list(stream(iter([_oip_add_sub(1), _oip_add_sub(32), _oip_add_sub(1)]), timeout=30))
        assert [bool(response.error_message) for response in responses] == [False, True, False]
        assert "max_frame_bytes=512" in responses[1].error_message
        assert responses[2].infer_response.raw_output_contents


def test_max_request_rows_and_max_batch_size_bound_the_rows(repository: Path) -> None:
    with running_server(repository, max_request_rows=4) as server, grpc.insecure_channel(server.address) as channel:
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        assert predict(_add_sub(rows=4), timeout=30).outputs
        error = _error(predict, _add_sub(rows=5), timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'a'" in (error.details() or "")
        assert "max_request_rows=4" in (error.details() or "")
        # The model's own bound, max_batch_size (64 for add_sub), applies too, and is named as such.
        error = _error(predict, _add_sub(rows=65), timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch_size" in (error.details() or "")
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        error = _error(infer, _oip_add_sub(rows=5), timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_request_rows=4" in (error.details() or "")


def test_max_tensor_elements_is_checked_before_decoding(repository: Path) -> None:
    # A header claiming 2**40 elements with no data: refused for its size, before its bytes are even looked at.
    huge = tensor_pb2.Tensor(name="a", dtype=to_wire_dtype("FP32"), shape=[1, 2**40], raw=b"")
    b = to_tensor("b", np.ones((1, 4), np.float32))
    with running_server(repository, max_tensor_elements=64) as server, grpc.insecure_channel(server.address) as channel:
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        error = _error(predict, predict_pb2.PredictRequest(model="add_sub", inputs=[huge, b]), timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'a'" in (error.details() or "")
        assert "max_tensor_elements=64" in (error.details() or "")

        request = _oip_add_sub()
        request.inputs[1].shape[:] = [2**20, 2**20]
        error = _error(oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request, timeout=30)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'b'" in (error.details() or "")
        assert "max_tensor_elements=64" in (error.details() or "")

        assert predict(_add_sub(rows=16), timeout=30).outputs  # 64 elements each: at the limit, served

        with Client(server.address) as client:
            frames = [{"a": np.ones((rows, 4), np.float32), "b": np.ones((rows, 4), np.float32)} for rows in (1, 17, 1)]
            results = list(client.stream("add_sub", frames, policy="block"))
        assert [result.ok for result in results] == [True, False, True]
        error_result = results[1].error
        assert error_result is not None
        assert error_result.code == "INVALID_ARGUMENT"
        assert "max_tensor_elements=64" in error_result.message


def test_nonsensical_limits_stop_the_server_from_starting(repository: Path) -> None:
    for setting in ("max_frame_bytes", "rate_limit", "breaker_failures", "max_streams_per_connection"):
        with pytest.raises(ValueError, match=setting), running_server(repository, **{setting: -1}):
            pass


def test_limits_are_off_by_default(repository: Path) -> None:
    with running_server(repository) as server:
        with grpc.insecure_channel(server.address) as channel:
            assert predict_pb2_grpc.PredictStub(channel).Predict(_add_sub(rows=64), timeout=30).outputs
        assert server.server.overload.rate_limiter is None
        assert server.server.overload.server_options == ()
