"""A `tensorgate.v1`/OIP view of the engine chain: a `tensorrt_plan` model on a machine without TensorRT is served
by ONNX Runtime, and metadata, metrics and the model listing say so; with `fallback: "none"` it is not served."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tensorgate.client import Client
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.support.serving import EXAMPLE_MODELS, ServerThread
from tests.support.telemetry import scrape, telemetry_server


def _tensorrt_model(repo: Path, name: str, *, extra: str = "") -> None:
    """The bundled digits model, configured as a TensorRT plan, with only its ONNX file on disk."""
    config = (EXAMPLE_MODELS / "digits" / "config.pbtxt").read_text()
    config = config.replace('name: "digits"', f'name: "{name}"').replace(
        'platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"'
    )
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config + extra)
    shutil.copy(EXAMPLE_MODELS / "digits" / "1" / "model.onnx", repo / name / "1" / "model.onnx")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("fallback")
    _tensorrt_model(repo, "digits_trt")
    _tensorrt_model(repo, "digits_trt_strict", extra='parameters { key: "fallback" value: { string_value: "none" } }\n')
    with telemetry_server(repo, metrics_address="127.0.0.1:0") as (thread, _):
        yield thread


def test_served_by_onnxruntime_and_metadata_says_why(server: ServerThread) -> None:
    image = np.zeros((2, 1, 8, 8), np.float32)
    with Client(server.address) as client:
        outputs = client.predict("digits_trt", {"image": image})
        metadata = client.metadata("digits_trt")
    assert outputs["probabilities"].shape == (2, 10)
    assert metadata.platform == "onnxruntime_onnx"
    assert metadata.engine.startswith("onnxruntime")
    assert "fallback for tensorrt_plan" in metadata.engine


def test_oip_metadata_reports_the_serving_platform(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits_trt"), timeout=10)
        config = stub.ModelConfig(pb.ModelConfigRequest(name="digits_trt"), timeout=10).config
    assert metadata.platform == "onnxruntime_onnx"
    assert config.platform == "tensorrt_plan"  # the config is what was asked for


def test_metrics_label_the_serving_and_the_configured_platform(server: ServerThread) -> None:
    address = server.server.telemetry.metrics_address
    assert address is not None
    info = {
        dict(labels)["model"]: dict(labels)
        for (name, labels), value in scrape(address).items()
        if name == "tensorgate_model_engine_info" and value == 1
    }
    assert info["digits_trt"]["platform"] == "onnxruntime_onnx"
    assert info["digits_trt"]["configured_platform"] == "tensorrt_plan"
    assert "digits_trt_strict" not in info


def test_fallback_none_leaves_the_model_unserved_with_the_reason(server: ServerThread) -> None:
    with Client(server.address) as client:
        listed = {model.name: model for model in client.models()}
        assert not client.ready("digits_trt_strict")
    versions = listed["digits_trt_strict"].versions
    assert len(versions) == 1
    assert 'fallback: "none"' in versions[0].reason
