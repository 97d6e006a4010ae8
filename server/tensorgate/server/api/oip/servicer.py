"""`inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2 / Triton gRPC) over the same core.

Thin handlers: protobuf -> the core's request -> InferenceService / Repository -> protobuf. Errors are the
server's own exceptions, which the error interceptor maps to status codes exactly as for tensorgate's API.
ModelStreamInfer answers each request in order; a failed request gets `error_message` and the stream goes on.
The stream is an async generator (FACTS.md: context.read()/write() handlers break under interceptors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any

import grpc

from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.api.codec import RequestIds, deadline_from
from tensorgate.server.api.oip.infer import decode_request, encode_response, parse_version
from tensorgate.server.api.oip.models import model_config, model_metadata, model_statistics, repository_index
from tensorgate.server.errors import InvalidInputError, ModelNotFoundError, TensorgateError
from tensorgate.server.inference import InferenceService
from tensorgate.server.repository import ModelVersion
from tensorgate.server.repository.routing import RoutingHints, routing_hints

__all__ = ["EXTENSIONS", "InferenceServicer"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Pending = asyncio.Queue["asyncio.Task[pb.ModelStreamInferResponse] | None"]

#: The protocol extensions ServerMetadata announces.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "parameters", "statistics")


def _server_version() -> str:
    try:
        return metadata.version("tensorgate")
    except metadata.PackageNotFoundError:
        return "unknown"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol's gRPC service.

    `serving()` says whether the server takes requests (ServerReady); `model_changed(name)` is awaited after a
    model is loaded or unloaded (to update its health status).
    """

    def __init__(
        self,
        service: InferenceService,
        request_ids: RequestIds,
        *,
        serving: Callable[[], bool] = lambda: True,
        model_changed: Callable[[str], Awaitable[None]] | None = None,
        max_in_flight: int = 16,
    ) -> None:
        self._service = service
        self._repository = service.repository
        self._request_ids = request_ids
        self._serving = serving
        self._model_changed = model_changed
        self._max_in_flight = max_in_flight
        self._version = _server_version()

    # -- health and metadata -----------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:  # noqa: N802
        """Live while the process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:  # noqa: N802
        """Ready while serving (as the overall health status), false once draining."""
        return pb.ServerReadyResponse(ready=self._serving())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:  # noqa: N802
        """Whether the model (or the given version) takes requests; false for an unknown model, as in Triton."""
        version = parse_version(request.version, "version")
        try:
            entry = self._repository.model(request.name)
        except ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)
        if version is not None:
            found = entry.versions.get(version)
            return pb.ModelReadyResponse(ready=found is not None and found.ready)
        return pb.ModelReadyResponse(ready=entry.ready)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions."""
        return pb.ServerMetadataResponse(name="tensorgate", version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        """The tensors of the version a request would reach (or of the version asked for)."""
        target = self._repository.resolve(request.name, parse_version(request.version, "version"))
        return model_metadata(target, self._repository.model(request.name))

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:  # noqa: N802
        """The completed configuration of the version a request would reach (or of the version asked for)."""
        return model_config(self._repository.resolve(request.name, parse_version(request.version, "version")))

    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        """Cumulative statistics per loaded version: of every model, of one, or of one version."""
        version = parse_version(request.version, "version")
        if not request.name:
            if version is not None:
                raise InvalidInputError("a version needs a model name")
            entries = self._repository.models()
        else:
            entries = [self._repository.model(request.name)]
        response = pb.ModelStatisticsResponse()
        for entry in entries:
            if version is not None and version not in entry.versions:
                raise ModelNotFoundError(f"model {entry.name!r} has no version {version}")
            for number, found in sorted(entry.versions.items()):
                if (version is None or number == version) and found.ready:
                    response.model_stats.append(model_statistics(entry.name, number, found.statistics.snapshot()))
        return response

    # -- repository --------------------------------------------------------------------------------------

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        """Every model version and its state (one repository: `repository_name` is not consulted)."""
        return repository_index(self._repository.models(), ready_only=request.ready)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        """Load (or reload) a model directory of the repository by name; returns once it serves."""
        unsupported = [key for key in request.parameters if key == "config" or key.startswith("file:")]
        if unsupported:
            raise InvalidInputError(
                f"load parameter {unsupported[0]!r} is not supported: tensorgate loads models from the repository "
                "directory only"
            )
        try:
            await self._repository.load_model(request.model_name)
        finally:
            await self._changed(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving a model: new requests are refused at once, queued ones finish; returns once unloaded."""
        await self._repository.unload_model(request.model_name)
        await self._changed(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _changed(self, name: str) -> None:
        if self._model_changed is not None:
            with contextlib.suppress(ModelNotFoundError):
                await self._model_changed(name)

    # -- inference ---------------------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:  # noqa: N802
        """Run one request through the model's batcher."""
        return await self._infer(request, deadline_from(context), routing_hints(context.invocation_metadata()))

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, routing: RoutingHints | None = None
    ) -> pb.ModelInferResponse:
        self._service.limits.check_elements(request.inputs)  # before decoding: a huge shape costs nothing
        core, options = decode_request(
            request, request_id=request.id or self._request_ids.new(), call_deadline=deadline
        )
        core.routing = routing  # the call's headers: a version pin, the weighted routing key
        result = await self._service.infer(core)
        target: ModelVersion | None = None
        if options.classification:
            target = self._repository.resolve(result.model, result.version)
        return encode_response(
            request.id,
            result,
            options,
            batched=bool(target is not None and target.config.max_batch_size > 0),
            labels=(lambda name: self._labels(target, name)) if target is not None else None,
        )

    def _labels(self, target: ModelVersion, output: str) -> list[str]:
        """The class labels of an output, from its config's label_filename (read per request that asks)."""
        for spec in target.config.output:
            if spec.name == output and spec.label_filename:
                path = self._repository.root / target.name / spec.label_filename
                try:
                    return path.read_text(encoding="utf-8").splitlines()
                except (OSError, UnicodeDecodeError) as exc:
                    log.warning("model %s: labels of output %s cannot be read: %s", target.name, output, exc)
        return []

    async def ModelStreamInfer(  # noqa: N802
        self, request_iterator: AsyncIterable[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in request order; a failed request's response carries `error_message`."""
        pending: Pending = asyncio.Queue(self._max_in_flight)
        routing = routing_hints(context.invocation_metadata())  # the call's headers hold for all its requests
        reader = asyncio.create_task(self._read(aiter(request_iterator), deadline_from(context), routing, pending))
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # re-raises what stopped the reader, if anything did
        finally:
            reader.cancel()
            while not pending.empty():
                if (task := pending.get_nowait()) is not None:
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        deadline: float | None,
        routing: RoutingHints | None,
        pending: Pending,
    ) -> None:
        try:
            async for request in requests:
                await pending.put(asyncio.create_task(self._stream_one(request, deadline, routing)))
        finally:
            await pending.put(None)

    async def _stream_one(
        self, request: pb.ModelInferRequest, deadline: float | None, routing: RoutingHints | None
    ) -> pb.ModelStreamInferResponse:
        try:
            if self._service.limits.max_frame_bytes:
                self._service.limits.check_frame(request.ByteSize(), "streamed request")
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, deadline, routing))
        except TensorgateError as exc:
            message = str(exc)
        except Exception as exc:  # a bug, but one request's: the stream and its other requests go on
            log.exception("unexpected error on a streamed request (id %r)", request.id)
            message = f"internal error: {type(exc).__name__}: {exc}"
        # The request's identity comes back with the error, so clients can match it to what they sent.
        identity = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return pb.ModelStreamInferResponse(error_message=message, infer_response=identity)
