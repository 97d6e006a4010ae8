"""`tensorgate.v1.Models`: what is served, with which tensors, and whether it is ready."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from tensorgate.client.tensors import dtype_name, to_wire_dtype
from tensorgate.engines import TensorSpec
from tensorgate.server.repository import ModelEntry, Repository, VersionState
from tensorgate.v1 import models_pb2, models_pb2_grpc, tensor_pb2

__all__ = ["ModelsServicer", "model_status"]

_STATES = {
    VersionState.LOADING: models_pb2.VERSION_STATE_LOADING,
    VersionState.READY: models_pb2.VERSION_STATE_READY,
    VersionState.UNLOADING: models_pb2.VERSION_STATE_UNLOADING,
    VersionState.FAILED: models_pb2.VERSION_STATE_FAILED,
}

Context = grpc.aio.ServicerContext[Any, Any]


def model_status(entry: ModelEntry) -> models_pb2.ModelStatus:
    """The wire form of a model directory's state."""
    return models_pb2.ModelStatus(
        name=entry.name,
        platform=entry.platform,
        reason=entry.reason,
        versions=[
            models_pb2.VersionStatus(version=v.version, state=_STATES[v.state], reason=v.reason)
            for _, v in sorted(entry.versions.items())
        ],
    )


def _specs(specs: Iterable[TensorSpec]) -> list[tensor_pb2.TensorSpec]:
    return [
        tensor_pb2.TensorSpec(name=spec.name, dtype=to_wire_dtype(dtype_name(spec.dtype)), shape=spec.shape)
        for spec in specs
    ]


class ModelsServicer(models_pb2_grpc.ModelsServicer):
    """Lists models and reports their metadata and readiness."""

    def __init__(self, repository: Repository) -> None:
        self._repository = repository

    async def List(  # noqa: N802 (the gRPC method's name)
        self, request: models_pb2.ListModelsRequest, context: Context
    ) -> models_pb2.ListModelsResponse:
        """Every model directory, each version's state, and why a model or version is not ready."""
        return models_pb2.ListModelsResponse(models=[model_status(e) for e in self._repository.models()])

    async def Metadata(  # noqa: N802
        self, request: models_pb2.ModelMetadataRequest, context: Context
    ) -> models_pb2.ModelMetadataResponse:
        """The tensors of the version a request would reach (or of the version asked for)."""
        target = self._repository.resolve(request.model, request.version or None)
        assert target.signature is not None  # a resolved version is ready
        return models_pb2.ModelMetadataResponse(
            name=target.name,
            version=target.version,
            platform=target.serving_platform or target.platform,
            inputs=_specs(target.signature.inputs),
            outputs=_specs(target.signature.outputs),
            max_batch_size=target.signature.max_batch_size,
            engine=target.engine_description,
        )

    async def Ready(  # noqa: N802
        self, request: models_pb2.ModelReadyRequest, context: Context
    ) -> models_pb2.ModelReadyResponse:
        """Whether the model (or the given version) takes requests; NOT_FOUND for an unknown model."""
        entry = self._repository.model(request.model)
        if request.version:
            version = entry.versions.get(request.version)
            return models_pb2.ModelReadyResponse(ready=version is not None and version.ready)
        return models_pb2.ModelReadyResponse(ready=entry.ready)
