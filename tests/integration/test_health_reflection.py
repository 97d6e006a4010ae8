"""The standard services: grpc.health.v1.Health (overall and per model) and server reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "service",
    ["", "digits", "add_sub", "tensorgate.v1.Predict", "tensorgate.v1.Stream", "tensorgate.v1.Models"],
)
def test_health_serving(channel: grpc.Channel, service: str) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == SERVING


def test_health_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_our_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="tensorgate.v1.Predict"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {service.name for service in listed.list_services_response.service}
    assert {
        "tensorgate.v1.Predict",
        "tensorgate.v1.Stream",
        "tensorgate.v1.Models",
        "grpc.health.v1.Health",
    } <= names
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"tensorgate/v1/predict.proto" in blob for blob in files)
