"""RepositoryModelLoad / RepositoryModelUnload for real: the repository, health per model, drains, failures."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import Client
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.integration.oip_engines import GateEngine, add_gate_model
from tests.support.serving import EXAMPLE_MODELS, ServerThread, copy_models, running_server

Stub = pb_grpc.GRPCInferenceServiceStub
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerThread, grpc.Channel]]:
    repository = copy_models(tmp_path / "repository", "add_sub")
    add_gate_model(repository)
    with running_server(repository) as running, grpc.insecure_channel(running.address) as channel:
        try:
            yield running, channel
        finally:
            GateEngine.gate.set()


def _health(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    status: int = reply.status
    return status


def _index(stub: Stub) -> dict[str, tuple[str, str, str]]:
    reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return {m.name: (m.version, m.state, m.reason) for m in reply.models}


def _failure(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    error: Any = caught.value
    return error.code(), error.details()


def _add_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name in ("a", "b"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


def _add(stub: Stub, model: str) -> pb.ModelInferResponse:
    return stub.ModelInfer(_add_request(model), timeout=30)


def test_load_a_new_directory_then_unload_it(server: tuple[ServerThread, grpc.Channel]) -> None:
    running, channel = server
    stub = Stub(channel)
    shutil.copytree(EXAMPLE_MODELS / "add_sub", running.settings.repository / "adder")
    assert "adder" not in _index(stub)
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="adder"), timeout=60)
    assert _index(stub)["adder"] == ("1", "READY", "")
    assert _health(channel, "adder") == SERVING
    assert np.frombuffer(_add(stub, "adder").raw_output_contents[0], np.float32).tolist() == [2.0] * 4
    with Client(running.address, timeout=30) as client:
        assert client.ready("adder")
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="adder"), timeout=60)
    assert _index(stub)["adder"] == ("", "UNAVAILABLE", "unloaded")
    assert _health(channel, "adder") == NOT_SERVING
    assert not stub.ModelReady(pb.ModelReadyRequest(name="adder"), timeout=10).ready
    code, details = _failure(stub.ModelInfer, _add_request("adder"))
    assert (code, "unloaded" in details) == (grpc.StatusCode.UNAVAILABLE, True)
    # The other models never noticed.
    assert _add(stub, "add_sub").raw_output_contents


def test_a_failed_reload_keeps_the_serving_version(server: tuple[ServerThread, grpc.Channel]) -> None:
    running, channel = server
    stub = Stub(channel)
    config = running.settings.repository / "add_sub" / "config.pbtxt"
    config.write_text('name: "add_sub"\nmax_batch_size: 8\nbogus_field: 1\n')
    code, details = _failure(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="add_sub"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "bogus_field" in details
    assert _add(stub, "add_sub").raw_output_contents  # still the old one
    assert _health(channel, "add_sub") == SERVING
    # Fixed: the reload takes, and the new config (max_batch_size 8) is what ModelConfig reports.
    config.write_text('name: "add_sub"\nmax_batch_size: 8\ndynamic_batching { }\n')
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="add_sub"), timeout=60)
    assert stub.ModelConfig(pb.ModelConfigRequest(name="add_sub"), timeout=10).config.max_batch_size == 8
    assert _add(stub, "add_sub").raw_output_contents


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.RepositoryModelLoadRequest(model_name="missing"), grpc.StatusCode.NOT_FOUND, ["missing"]),
        (pb.RepositoryModelLoadRequest(model_name="../add_sub"), grpc.StatusCode.INVALID_ARGUMENT, ["directory"]),
        (pb.RepositoryModelLoadRequest(model_name=""), grpc.StatusCode.INVALID_ARGUMENT, ["directory"]),
        (
            pb.RepositoryModelLoadRequest(
                model_name="add_sub", parameters={"config": pb.ModelRepositoryParameter(string_param="{}")}
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ["'config'"],
        ),
    ],
    ids=["missing", "traversal", "empty", "config-override"],
)
def test_bad_loads(
    server: tuple[ServerThread, grpc.Channel], request_: pb.RepositoryModelLoadRequest, code: Any, words: list[str]
) -> None:
    got, details = _failure(Stub(server[1]).RepositoryModelLoad, request_)
    assert got == code, details
    for word in words:
        assert word in details


def test_unload_drains_queued_requests_and_refuses_new_ones(server: tuple[ServerThread, grpc.Channel]) -> None:
    running, channel = server
    stub = Stub(channel)

    def x(value: float) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="gate")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.array([[value]], np.float32).tobytes())
        return request

    with futures.ThreadPoolExecutor(4) as pool:
        running_call = pool.submit(stub.ModelInfer, x(1.0), timeout=60)
        assert GateEngine.entered.wait(30)
        queued_call = pool.submit(stub.ModelInfer, x(2.0), timeout=60)
        batcher = running.server.repository.resolve("gate").batcher
        assert batcher is not None
        give_up = time.monotonic() + 30
        while batcher.queue_depth != 1:
            assert time.monotonic() < give_up
            time.sleep(0.005)
        unload = pool.submit(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="gate"), timeout=60)
        while _index(stub)["gate"][1] != "UNLOADING":
            assert time.monotonic() < give_up
            time.sleep(0.005)
        code, details = _failure(stub.ModelInfer, x(3.0))
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert not unload.done()  # it waits for the drain
        GateEngine.gate.set()
        assert [call.result(60).outputs[0].name for call in (running_call, queued_call)] == ["y", "y"]
        unload.result(60)
    assert GateEngine.batches == [[1.0], [2.0]]
    assert _index(stub)["gate"] == ("", "UNAVAILABLE", "unloaded")
    assert _health(channel, "gate") == NOT_SERVING
