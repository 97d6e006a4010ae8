"""The model repository over the wire: broken models are listed with their reason, the rest serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client.tensors import to_tensor
from tensorgate.v1 import models_pb2, models_pb2_grpc, predict_pb2, predict_pb2_grpc
from tests.support.serving import copy_models, running_server

READY = models_pb2.VERSION_STATE_READY
FAILED = models_pb2.VERSION_STATE_FAILED


def _statuses(channel: grpc.Channel) -> dict[str, models_pb2.ModelStatus]:
    reply = models_pb2_grpc.ModelsStub(channel).List(models_pb2.ListModelsRequest(), timeout=10)
    return {model.name: model for model in reply.models}


def _health(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    status: int = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
    return status


def _add(channel: grpc.Channel, model: str = "add_sub", version: int = 0) -> predict_pb2.PredictResponse:
    a = np.ones((1, 4), np.float32)
    request = predict_pb2.PredictRequest(model=model, version=version, inputs=[to_tensor("a", a), to_tensor("b", a)])
    return predict_pb2_grpc.PredictStub(channel).Predict(request, timeout=10)


def _with_config(repo: Path, model: str, text: str) -> None:
    (repo / model / "config.pbtxt").write_text(text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return copy_models(tmp_path / "models")


def test_broken_models_are_listed_with_reasons_and_the_rest_serve(repo: Path) -> None:
    shutil.copytree(repo / "add_sub", repo / "unknown_field")
    _with_config(repo, "unknown_field", 'name: "unknown_field"\nmax_batch_size: 8\nbatch_magic: 3\n')
    shutil.copytree(repo / "add_sub", repo / "bad_value")
    _with_config(repo, "bad_value", "max_batch_size: -4\n")
    shutil.copytree(repo / "add_sub", repo / "broken_file")
    (repo / "broken_file" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    shutil.copytree(repo / "add_sub", repo / "bad_parameter")
    _with_config(repo, "bad_parameter", 'parameters { key: "intra_op_threads" value: { string_value: "x" } }\n')
    shutil.copytree(repo / "add_sub", repo / "wrong_dtype")
    _with_config(
        repo,
        "wrong_dtype",
        'max_batch_size: 8\ninput [{ name: "a" data_type: TYPE_INT32 dims: [4] },'
        ' { name: "b" data_type: TYPE_FP32 dims: [4] }]\n',
    )

    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        models = _statuses(channel)
        assert "unknown_field/config.pbtxt" in models["unknown_field"].reason
        assert "batch_magic" in models["unknown_field"].reason
        assert "max_batch_size must be >= 0" in models["bad_value"].reason
        (broken,) = models["broken_file"].versions
        assert broken.state == FAILED
        assert "broken_file/1/model.onnx" in broken.reason
        (wrong,) = models["wrong_dtype"].versions
        assert wrong.state == FAILED
        assert "input 'a' is INT32 in the config but FP32 in the model" in wrong.reason
        (bad_parameter,) = models["bad_parameter"].versions
        assert bad_parameter.state == FAILED
        assert "parameter 'intra_op_threads' must be a whole number, got 'x'" in bad_parameter.reason

        for name in ("unknown_field", "bad_value", "broken_file", "bad_parameter", "wrong_dtype"):
            assert _health(channel, name) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as caught:
                _add(channel, name)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no ready version" in (caught.value.details() or "")

        assert _health(channel, "add_sub") == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert [v.state for v in models["digits"].versions] == [READY]
        assert len(_add(channel).outputs) == 2


def test_config_is_derived_from_the_model_when_absent(repo: Path) -> None:
    with (
        running_server(repo, default_max_batch_size=16) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        meta = models_pb2_grpc.ModelsStub(channel).Metadata(models_pb2.ModelMetadataRequest(model="add_sub"))
        assert meta.max_batch_size == 16
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [("a", [-1, 4]), ("b", [-1, 4])]
        assert {t.name for t in meta.outputs} == {"sum", "difference"}
        assert "onnxruntime" in meta.engine


def _versions(repo: Path, *numbers: int) -> None:
    for number in numbers:
        shutil.copytree(repo / "add_sub" / "1", repo / "add_sub" / str(number))


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", [3]),
        ("version_policy { latest { num_versions: 2 } }", [2, 3]),
        ("version_policy { all { } }", [1, 2, 3]),
        ("version_policy { specific { versions: [1, 3] } }", [1, 3]),
    ],
    ids=["default-latest", "latest-2", "all", "specific"],
)
def test_version_policy(repo: Path, policy: str, served: list[int]) -> None:
    _versions(repo, 2, 3)
    _with_config(repo, "add_sub", f"max_batch_size: 8\ndynamic_batching {{ }}\n{policy}\n")
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        versions = _statuses(channel)["add_sub"].versions
        assert [v.version for v in versions] == served
        assert all(v.state == READY for v in versions)
        assert _add(channel).version == max(served)  # no version asked: the highest ready one
        assert _add(channel, version=served[0]).version == served[0]
        unserved = next(n for n in (1, 2, 3) if n not in served) if len(served) < 3 else 9
        with pytest.raises(grpc.RpcError) as caught:
            _add(channel, version=unserved)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_specific_version_without_directory_is_reported(repo: Path) -> None:
    _with_config(repo, "add_sub", "version_policy { specific { versions: [4] } }\n")
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        reason = _statuses(channel)["add_sub"].reason
        assert "names versions [4] that have no directory" in reason


def test_model_without_versions_is_reported(repo: Path) -> None:
    (repo / "empty").mkdir()
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        assert "no version directories" in _statuses(channel)["empty"].reason
        assert len(_add(channel).outputs) == 2


def test_ready_rpc(repo: Path) -> None:
    with running_server(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = models_pb2_grpc.ModelsStub(channel)
        assert stub.Ready(models_pb2.ModelReadyRequest(model="digits")).ready
        assert stub.Ready(models_pb2.ModelReadyRequest(model="digits", version=1)).ready
        assert not stub.Ready(models_pb2.ModelReadyRequest(model="digits", version=2)).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.Ready(models_pb2.ModelReadyRequest(model="nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
