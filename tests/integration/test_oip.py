"""The Open Inference Protocol over the wire with our own stubs: what tritonclient never sends (typed contents,
malformed requests), the error taxonomy, the stream's error handling, parameters feeding the batcher, health,
reflection and statistics. (tritonclient itself: test_oip_tritonclient.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tensorgate.client import Client
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.integration.oip_engines import GateEngine, add_gate_model
from tests.support.serving import ServerThread, copy_models, running_server

Stub = pb_grpc.GRPCInferenceServiceStub


def raw_request(model: str, inputs: Mapping[str, npt.NDArray[Any]], **fields: Any) -> pb.ModelInferRequest:
    """A request with every input as raw little-endian bytes (FP32/INT64/... only)."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, array in inputs.items():
        datatype = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64"}
        request.inputs.add(name=name, datatype=datatype[array.dtype], shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return request


def add_sub_inputs(rows: int = 2) -> dict[str, npt.NDArray[Any]]:
    a = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    return {"a": a, "b": np.full((rows, 4), 0.5, np.float32)}


def outputs_of(response: pb.ModelInferResponse) -> dict[str, npt.NDArray[Any]]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {
        tensor.name: np.frombuffer(raw, dtypes[tensor.datatype]).reshape(tensor.shape)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def failure(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    error: Any = caught.value
    return error.code(), error.details()


@pytest.fixture
def stub(channel: grpc.Channel) -> Stub:
    return Stub(channel)


# -- ModelInfer ----------------------------------------------------------------------------------------------


def test_raw_infer_echoes_the_id_and_computes(stub: Stub) -> None:
    inputs = add_sub_inputs()
    response = stub.ModelInfer(raw_request("add_sub", inputs, id="req-7"), timeout=30)
    assert (response.model_name, response.model_version, response.id) == ("add_sub", "1", "req-7")
    got = outputs_of(response)
    np.testing.assert_array_equal(got["sum"], inputs["a"] + inputs["b"])
    np.testing.assert_array_equal(got["difference"], inputs["a"] - inputs["b"])
    assert [t.name for t in response.outputs] == ["sum", "difference"]


def test_typed_contents_in_and_requested_outputs(stub: Stub) -> None:
    inputs = add_sub_inputs()
    request = pb.ModelInferRequest(model_name="add_sub", model_version="1")
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype="FP32", shape=array.shape).contents.fp32_contents.extend(
            array.ravel().tolist()
        )
    request.outputs.add(name="difference")
    response = stub.ModelInfer(request, timeout=30)
    assert [t.name for t in response.outputs] == ["difference"]
    np.testing.assert_array_equal(outputs_of(response)["difference"], inputs["a"] - inputs["b"])


def test_binary_data_false_gives_typed_outputs(stub: Stub) -> None:
    inputs = add_sub_inputs()
    request = raw_request("add_sub", inputs)
    for name in ("sum", "difference"):
        request.outputs.add(name=name).parameters["binary_data"].bool_param = False
    response = stub.ModelInfer(request, timeout=30)
    assert not response.raw_output_contents
    total = response.outputs[0]
    assert (total.name, total.datatype, list(total.shape)) == ("sum", "FP32", [2, 4])
    expected = (inputs["a"] + inputs["b"]).ravel()
    np.testing.assert_array_equal(np.array(total.contents.fp32_contents, np.float32), expected)


def test_classification_parameter(stub: Stub) -> None:
    image = np.random.default_rng(1).uniform(0, 16, (2, 1, 8, 8)).astype(np.float32)
    request = raw_request("digits", {"image": image})
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    response = stub.ModelInfer(request, timeout=30)
    (tensor,) = response.outputs
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [2, 2])
    raw = response.raw_output_contents[0]
    first_length = int.from_bytes(raw[:4], "little")
    value, index = raw[4 : 4 + first_length].decode().split(":")
    assert 0 <= int(index) <= 9
    assert 0 < float(value) <= 1


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda r: r.raw_input_contents.pop(), ["raw_input_contents has 1 entries for 2 inputs"]),
        (lambda r: r.raw_input_contents.append(b"\0" * 32), ["3 entries for 2 inputs"]),
        (lambda r: r.inputs[1].contents.fp32_contents.extend([0.0] * 8), ["'b'", "typed contents", "raw"]),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), ["'a'", "32 bytes", "FP64 needs 64"]),
        (lambda r: setattr(r.inputs[0], "datatype", "FLOAT"), ["'a'", "unknown datatype 'FLOAT'"]),
        (lambda r: r.inputs[0].shape.__setitem__(0, -2), ["'a'", "negative"]),
        (lambda r: r.inputs[1].shape.__setitem__(1, 5), ["'b'", "32 bytes", "needs 40"]),
        (lambda r: setattr(r.inputs[1], "name", "a"), ["'a'", "more than once"]),
        (lambda r: setattr(r.inputs[1], "name", "c"), ["missing input 'b'"]),
        (
            lambda r: (r.inputs.add(name="c", datatype="FP32", shape=[2, 4]), r.raw_input_contents.append(bytes(32))),
            ["unknown input 'c'"],
        ),
        (lambda r: r.outputs.add(name="product"), ["unknown output 'product'"]),
        (lambda r: r.outputs.extend([pb.ModelInferRequest.InferRequestedOutputTensor(name="sum")] * 2), ["'sum'"]),
        (lambda r: setattr(r, "model_version", "one"), ["model_version 'one'"]),
        (lambda r: r.parameters["priority"].string_param, ["'priority'", "integer"]),
        (lambda r: setattr(r.parameters["priority"], "int64_param", -1), ["'priority'", ">= 0"]),
        (lambda r: setattr(r.parameters["priority"], "int64_param", 3), ["priority 3"]),
        (lambda r: setattr(r.parameters["timeout"], "int64_param", -5), ["'timeout'"]),
        (lambda r: setattr(r.parameters["sequence_id"], "int64_param", 9), ["sequence"]),
    ],
    ids=[
        "raw-too-few",
        "raw-too-many",
        "raw-and-typed",
        "dtype",
        "unknown-datatype",
        "negative-dim",
        "byte-length",
        "duplicate-input",
        "missing-input",
        "unknown-input",
        "unknown-output",
        "duplicate-output",
        "bad-version",
        "priority-type",
        "priority-negative",
        "priority-level",
        "timeout-negative",
        "sequence",
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_problem(stub: Stub, mutate: Any, words: list[str]) -> None:
    request = raw_request("add_sub", add_sub_inputs())
    request.outputs.add(name="sum")
    mutate(request)
    code, details = failure(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    for word in words:
        assert word in details


@pytest.mark.parametrize(
    ("contents", "datatype", "words"),
    [
        (pb.InferTensorContents(fp32_contents=[1.0] * 7), "FP32", ["'a'", "7 values", "needs 8"]),
        (pb.InferTensorContents(int_contents=[1] * 8), "FP32", ["'a'", "fp32_contents", "int_contents"]),
        (pb.InferTensorContents(), "FP16", ["'a'", "FP16", "raw_input_contents"]),
        (pb.InferTensorContents(int_contents=[300] * 8), "INT8", ["'a'", "range"]),
    ],
    ids=["count", "wrong-field", "fp16-typed", "int8-range"],
)
def test_bad_typed_contents_are_invalid_argument(
    stub: Stub, contents: pb.InferTensorContents, datatype: str, words: list[str]
) -> None:
    request = pb.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="a", datatype=datatype, shape=[2, 4], contents=contents)
    request.inputs.add(name="b", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend([0.0] * 8)
    code, details = failure(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    for word in words:
        assert word in details


def test_unknown_model_and_version_are_not_found(stub: Stub) -> None:
    code, details = failure(stub.ModelInfer, raw_request("nope", add_sub_inputs()))
    assert (code, "'nope'" in details) == (grpc.StatusCode.NOT_FOUND, True)
    code, details = failure(stub.ModelInfer, raw_request("add_sub", add_sub_inputs(), model_version="4"))
    assert (code, "version 4" in details) == (grpc.StatusCode.NOT_FOUND, True)
    for call, request in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
        (stub.ModelConfig, pb.ModelConfigRequest(name="nope")),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="nope")),
    ):
        assert failure(call, request)[0] == grpc.StatusCode.NOT_FOUND


def test_message_over_the_limit_is_resource_exhausted(tmp_path: Path) -> None:
    with (
        running_server(copy_models(tmp_path, "add_sub"), max_message_bytes=16 * 1024) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = Stub(channel)
        code, _ = failure(stub.ModelInfer, raw_request("add_sub", add_sub_inputs(rows=640)))  # 20 KiB
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert outputs_of(stub.ModelInfer(raw_request("add_sub", add_sub_inputs()), timeout=30))


# -- ModelStreamInfer ------------------------------------------------------------------------------------------


def test_stream_errors_come_back_inside_and_the_stream_goes_on(stub: Stub) -> None:
    good = raw_request("add_sub", add_sub_inputs(), id="g1")
    bad_shape = raw_request("add_sub", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 3), np.float32)}, id="b1")
    mixed = raw_request("add_sub", add_sub_inputs(), id="b2")
    mixed.raw_input_contents.pop()
    unknown = raw_request("nope", add_sub_inputs(), id="b3")
    last = raw_request("add_sub", add_sub_inputs(rows=1), id="g2")
    responses = list(stub.ModelStreamInfer(iter([good, bad_shape, mixed, unknown, last]), timeout=30))
    assert [r.infer_response.id for r in responses] == ["g1", "b1", "b2", "b3", "g2"]
    assert [bool(r.error_message) for r in responses] == [False, True, True, True, False]
    assert "'a'" in responses[1].error_message
    assert "raw_input_contents" in responses[2].error_message
    assert "'nope'" in responses[3].error_message
    np.testing.assert_array_equal(outputs_of(responses[4].infer_response)["sum"], add_sub_inputs(1)["a"] + 0.5)


def test_undecodable_stream_message_ends_the_stream_invalid_argument(channel: grpc.Channel) -> None:
    call: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None, response_deserializer=None
    )
    messages = [raw_request("add_sub", add_sub_inputs()).SerializeToString(), b"\xff\xff\xff"]
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter(messages), timeout=30))
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be parsed" in error.details()


# -- health, metadata, reflection, statistics -------------------------------------------------------------------


def test_server_and_model_readiness(stub: Stub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=10).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="digits", version="2"), timeout=10).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope"), timeout=10).ready
    assert failure(stub.ModelReady, pb.ModelReadyRequest(name="digits", version="x"))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_health_and_reflection_list_the_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    assert "inference.GRPCInferenceService" in {s.name for s in listed.list_services_response.service}
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"tensorgate/oip/grpc_service.proto" in blob for blob in files)


def test_statistics_count_requests_from_both_apis(stub: Stub, served: ServerThread) -> None:
    def digits_stats() -> pb.ModelStatistics:
        (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits", version="1"), timeout=10).model_stats
        return stats

    before = digits_stats()
    image = np.zeros((3, 1, 8, 8), np.float32)
    stub.ModelInfer(raw_request("digits", {"image": image}), timeout=30)
    with Client(served.address, timeout=30) as client:
        client.predict("digits", {"image": image[:2]})
    failure(stub.ModelInfer, raw_request("digits", {"image": image[:, 0]}))  # wrong rank: reaches the model, fails
    after = digits_stats()
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert after.inference_stats.fail.count - before.inference_stats.fail.count == 1
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == 2
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert after.inference_count - before.inference_count == 5
    assert after.last_inference > 0
    sizes = {batch.batch_size: batch.compute_infer.count for batch in after.batch_stats}
    assert set(sizes) >= {3, 2}


# -- parameters feeding the batcher, and a full queue: a model whose batches wait at a gate ----------------------


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[ServerThread, Stub]]:
    add_gate_model(tmp_path)
    with running_server(tmp_path) as server, grpc.insecure_channel(server.address) as channel:
        try:
            yield server, Stub(channel)
        finally:
            GateEngine.gate.set()


def _x(value: float, **fields: Any) -> pb.ModelInferRequest:
    return raw_request("gate", {"x": np.array([[value]], np.float32)}, **fields)


def _queued(server: ServerThread, depth: int) -> None:
    """Wait until the gate model's queue holds `depth` requests (the calls are on their way: no fixed sleep)."""
    batcher = server.server.repository.resolve("gate").batcher
    assert batcher is not None
    give_up = time.monotonic() + 30
    while batcher.queue_depth != depth:
        assert time.monotonic() < give_up, f"the queue holds {batcher.queue_depth}, not {depth}"
        time.sleep(0.005)


def test_priority_parameter_orders_the_queue_and_a_full_queue_is_resource_exhausted(
    gated: tuple[ServerThread, Stub],
) -> None:
    server, stub = gated
    with futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(stub.ModelInfer, _x(1.0), timeout=60)
        assert GateEngine.entered.wait(30)  # the first batch holds the engine
        low = pool.submit(stub.ModelInfer, _x(2.0), timeout=60)  # default level 2
        _queued(server, 1)
        high = _x(3.0)
        high.parameters["priority"].uint64_param = 1
        urgent = pool.submit(stub.ModelInfer, high, timeout=60)
        _queued(server, 2)
        code, details = failure(stub.ModelInfer, _x(4.0))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in details
        GateEngine.gate.set()
        for call in (first, low, urgent):
            assert call.result(60).outputs[0].name == "y"
    # The priority-1 request went into the next batch ahead of the earlier priority-2 one.
    assert GateEngine.batches == [[1.0], [3.0, 2.0]]


def test_timeout_parameter_is_the_requests_deadline(gated: tuple[ServerThread, Stub]) -> None:
    _, stub = gated
    with futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(stub.ModelInfer, _x(1.0), timeout=60)
        assert GateEngine.entered.wait(30)
        late = _x(2.0)
        late.parameters["timeout"].int64_param = 20_000  # microseconds: it cannot run before the gate opens
        code, details = failure(stub.ModelInfer, late)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert "in the queue" in details  # the server's own deadline, not the call's (30 s)
        GateEngine.gate.set()
        assert first.result(60).outputs
    (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name="gate"), timeout=10).model_stats
    assert (stats.inference_stats.success.count, stats.inference_stats.fail.count) == (1, 1)
    assert GateEngine.batches == [[1.0]]  # the expired request never reached the engine
