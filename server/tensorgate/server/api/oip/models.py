"""What the repository knows, in the Open Inference Protocol's messages: metadata, config, index, statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from tensorgate.client.tensors import dtype_name
from tensorgate.engines import EngineError, TensorSpec, registration
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import model_config_pb2
from tensorgate.server.repository import ModelEntry, ModelVersion, VersionState
from tensorgate.server.statistics import Duration, StatisticsSnapshot

__all__ = ["model_config", "model_metadata", "model_statistics", "repository_index"]

#: Triton's model states, as RepositoryIndex spells them.
STATES = {
    VersionState.LOADING: "LOADING",
    VersionState.READY: "READY",
    VersionState.UNLOADING: "UNLOADING",
    VersionState.FAILED: "UNAVAILABLE",
}


def _tensors(specs: Iterable[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=dtype_name(spec.dtype), shape=spec.shape)
        for spec in specs
    ]


def model_metadata(target: ModelVersion, entry: ModelEntry) -> pb.ModelMetadataResponse:
    """The tensors of `target` (batch dimension included as -1 when it batches) and the model's ready versions."""
    assert target.signature is not None  # a resolved version is ready
    return pb.ModelMetadataResponse(
        name=target.name,
        versions=[str(number) for number, version in sorted(entry.versions.items()) if version.ready],
        # The platform actually serving the version: a TensorRT model that fell back to ONNX Runtime says so.
        platform=target.serving_platform or target.platform,
        inputs=_tensors(target.signature.inputs),
        outputs=_tensors(target.signature.outputs),
    )


def model_config(target: ModelVersion) -> pb.ModelConfigResponse:
    """The version's completed config as `inference.ModelConfig`, with the platform and backend filled in.

    `tensorgate.v1.ModelConfig` and our `inference.ModelConfig` share field numbers, so the wire format converts
    one into the other. Our own extensions (field numbers from 1000, e.g. `routing`) are not Triton's: the
    conversion would carry them as unknown fields, so they are dropped.
    """
    config = model_config_pb2.ModelConfig.FromString(target.config.SerializeToString())
    config.DiscardUnknownFields()
    config.platform = config.platform or target.platform
    if not config.backend:
        with contextlib.suppress(EngineError):
            config.backend = registration(target.platform).backend
    return pb.ModelConfigResponse(config=config)


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def model_statistics(name: str, version: int, snapshot: StatisticsSnapshot) -> pb.ModelStatistics:
    """One version's statistics."""
    return pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=snapshot.last_inference_ms,
        inference_count=snapshot.inference_count,
        execution_count=snapshot.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(snapshot.success),
            fail=_duration(snapshot.fail),
            queue=_duration(snapshot.queue),
            compute_input=_duration(snapshot.compute_input),
            compute_infer=_duration(snapshot.compute_infer),
            compute_output=_duration(snapshot.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=rows,
                compute_input=_duration(size.compute_input),
                compute_infer=_duration(size.compute_infer),
                compute_output=_duration(size.compute_output),
            )
            for rows, size in snapshot.batch_sizes
        ],
    )


def repository_index(entries: Iterable[ModelEntry], *, ready_only: bool) -> pb.RepositoryIndexResponse:
    """One entry per model version; a model without versions (unloaded, or unreadable) as one versionless entry."""
    index = pb.RepositoryIndexResponse()
    for entry in entries:
        if not entry.versions:
            if not ready_only:
                index.models.add(name=entry.name, state="UNAVAILABLE", reason=entry.reason)
            continue
        for number, version in sorted(entry.versions.items()):
            if ready_only and not version.ready:
                continue
            index.models.add(name=entry.name, version=str(number), state=STATES[version.state], reason=version.reason)
    return index
