"""`AsyncClient`: the asyncio client (grpc.aio), with `Client`'s methods as coroutines."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy.typing as npt

from tensorgate.client import _common, _health, _tracing
from tensorgate.client._common import Inputs, ModelInfo, ModelMetadata, RepositoryEntry, StreamFrame, StreamResult
from tensorgate.client.errors import InternalError, TensorgateClientError
from tensorgate.client.frames import Preprocessing
from tensorgate.v1 import models_pb2, models_pb2_grpc, predict_pb2_grpc, stream_pb2, stream_pb2_grpc

if TYPE_CHECKING:  # imported on first use only (see `AsyncClient._oip`)
    from tensorgate.oip.grpc_service_pb2_grpc import GRPCInferenceServiceAsyncStub

__all__ = ["AsyncClient"]


class AsyncClient:
    """An asyncio client for a tensorgate server: `Client`'s methods and arguments, awaited.

    Create it inside the event loop that uses it (grpc.aio binds a channel to its loop), and use it as
    `async with AsyncClient(...) as client:` or `await client.close()`. Every failed call raises a
    `tensorgate.client.errors.TensorgateClientError` subclass.

    Args:
        address: the server's "HOST:PORT".
        tls: use TLS with the system's root certificates (implied by any of the three below).
        root_certificates: PEM bytes, or a path to a PEM file, of the CAs to trust instead.
        private_key: the client's key for mutual TLS (PEM bytes or a path), with `certificate_chain`.
        certificate_chain: the client's certificate chain for mutual TLS (PEM bytes or a path).
        timeout: the default deadline of each unary call in seconds (None: none); streams never get it.
        options: gRPC channel options; they override the defaults (64 MiB message limits each way).
        metadata: gRPC metadata sent with every call, such as ("x-client-id", "camera-7").
        token: a bearer token, sent with every call as `authorization: Bearer <token>` metadata: what the
            server's `auth_token` asks of model load/unload calls (and of every call under `auth_inference`).
            Use TLS to keep it secret on anything but loopback.
        load_balancing: the channel's client-side load-balancing policy, "round_robin" or "pick_first" (gRPC's
            default). With "round_robin" and a target resolving to several servers, such as
            "dns:///tensorgate-headless:8001" (a headless Kubernetes Service), calls spread over all of them.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        private_key: bytes | str | os.PathLike[str] | None = None,
        certificate_chain: bytes | str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        options: Iterable[tuple[str, Any]] = (),
        metadata: Iterable[tuple[str, str | bytes]] = (),
        token: str | None = None,
        load_balancing: str | None = None,
    ) -> None:
        settings = _common.channel_settings(
            address,
            tls=tls,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            options=options,
            metadata=metadata,
            token=token,
            load_balancing=load_balancing,
        )
        if settings.credentials is None:
            self._channel = grpc.aio.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.aio.secure_channel(settings.target, settings.credentials, options=settings.options)
        self.address = address
        self.timeout = timeout
        self._fixed_metadata = settings.metadata or None
        self._predict = predict_pb2_grpc.PredictStub(self._channel)
        self._stream = stream_pb2_grpc.StreamStub(self._channel)
        self._models = models_pb2_grpc.ModelsStub(self._channel)
        # grpc-stubs leaves generic-call callables unparameterised; the (de)serializers fix the types.
        self._health_check: grpc.aio.UnaryUnaryMultiCallable[str, str] = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.encode_check_request,
            response_deserializer=_health.decode_check_response,
        )

    @property
    def _metadata(self) -> _tracing.Metadata | None:
        """Every call's metadata: the client's own, plus the caller's trace context when OpenTelemetry is installed."""
        return _tracing.outgoing(self._fixed_metadata)

    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        outputs: Iterable[str] | None = None,
        priority: int = 0,
        # A gRPC deadline, not an asyncio one: it travels to the server, which drops the request from its
        # queue once it expires, so asyncio.timeout() (what ASYNC109 suggests) would not do the same.
        timeout: float | None = None,  # noqa: ASYNC109
        request_id: str = "",
    ) -> dict[str, npt.NDArray[Any]]:
        """Run one request through the model and return its outputs by name; see `Client.predict`."""
        request = _common.build_predict_request(
            model, inputs, version=version, outputs=outputs, priority=priority, request_id=request_id
        )
        with _common.rpc_errors():
            response = await self._predict.Predict(
                request, timeout=_common.resolve_timeout(timeout, self.timeout), metadata=self._metadata
            )
        return _common.parse_outputs(response.outputs)

    async def stream(
        self,
        model: str,
        frames: AsyncIterable[StreamFrame] | Iterable[StreamFrame],
        *,
        version: int | None = None,
        outputs: Iterable[str] | None = None,
        policy: str | None = None,
        queue_size: int = 0,
        max_in_flight: int = 0,
        preprocessing: Preprocessing | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, see predict)
    ) -> AsyncGenerator[StreamResult, None]:
        """Send frames over one stream and yield their results in frame order; see `Client.stream`.

        `frames` may be an async iterable (a camera reader task) or a plain one; a plain one must not block,
        as it is read on the event loop. Use it as `async for result in client.stream(...)` (no `await`);
        leaving the loop early (or `await results.aclose()`) cancels the stream.
        """
        numberer = _common.FrameNumberer()
        config = _common.build_stream_config(
            model,
            version=version,
            outputs=outputs,
            policy=policy,
            queue_size=queue_size,
            max_in_flight=max_in_flight,
            preprocessing=preprocessing,
        )
        call = self._stream.Stream(_requests(config, frames, numberer), timeout=timeout, metadata=self._metadata)
        try:
            with _common.rpc_errors():
                async for response in call:
                    yield _common.parse_stream_response(response)
        except Exception as exc:
            if numberer.error is not None:
                raise numberer.error from None
            if isinstance(exc, TensorgateClientError) and _common.is_lost_stream_status(exc.__cause__):
                raise await self._lost_stream_status(model, version) from exc
            raise
        finally:
            call.cancel()  # a no-op once the call has finished
        if numberer.error is not None:
            raise numberer.error

    async def _lost_stream_status(self, model: str, version: int | None) -> TensorgateClientError:
        """The error to raise for a stream whose status grpc.aio lost (see `_common.is_lost_stream_status`).

        A server ends a stream early mostly because it cannot serve the stream's model (unknown model or
        version, loading, draining), which the same check as a unary call reports with its true code.
        """
        try:
            await self.metadata(model, version=version)
        except TensorgateClientError as exc:
            return exc
        return InternalError(
            grpc.StatusCode.INTERNAL,
            "the server ended the stream while a frame was being sent, and grpc.aio lost the status it sent "
            "(https://github.com/grpc/grpc/issues/36066)",
        )

    async def models(self) -> list[ModelInfo]:
        """Every model the server knows, with each version's state (also those not ready, with the reason)."""
        with _common.rpc_errors():
            response = await self._models.List(
                models_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        return _common.parse_models(response)

    async def metadata(self, model: str, *, version: int | None = None) -> ModelMetadata:
        """A model version's inputs, outputs and engine; None asks for the version the server would choose."""
        request = _common.build_metadata_request(model, version=version)
        with _common.rpc_errors():
            response = await self._models.Metadata(request, timeout=self.timeout, metadata=self._metadata)
        return _common.parse_metadata(response)

    async def ready(self, model: str, *, version: int | None = None) -> bool:
        """Whether the model (that version, or with None any version) can take requests now.

        Raises NotFoundError for a model the server does not know; a version it does not know is not ready.
        """
        request = _common.build_ready_request(model, version=version)
        with _common.rpc_errors():
            response = await self._models.Ready(request, timeout=self.timeout, metadata=self._metadata)
        return response.ready

    async def health(self, service: str = "") -> str:
        """The standard gRPC health status of the server ("") or of one service, e.g. "SERVING".

        Raises NotFoundError when the server does not know the service name.
        """
        with _common.rpc_errors():
            return await self._health_check(service, timeout=self.timeout, metadata=self._metadata)

    @functools.cached_property
    def _oip(self) -> GRPCInferenceServiceAsyncStub:
        # Imported on first use, as in `Client._oip` (tritonclient cannot share a process with these stubs).
        from tensorgate.oip import grpc_service_pb2_grpc

        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def load(
        self,
        model: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, see predict)
    ) -> list[RepositoryEntry]:
        """Load or reload the model directory `model`; return its repository index entries once it serves.

        See `Client.load` (the same errors: NotFoundError, InvalidArgumentError with the server's reason,
        UnauthenticatedError / PermissionDeniedError).
        """
        request = _common.build_load_request(model)
        deadline = _common.resolve_timeout(timeout, self.timeout)
        with _common.rpc_errors():
            await self._oip.RepositoryModelLoad(request, timeout=deadline, metadata=self._metadata)
            index = await self._oip.RepositoryIndex(
                _common.build_repository_request(), timeout=deadline, metadata=self._metadata
            )
        return _common.parse_repository(index, model=model)

    async def unload(
        self,
        model: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a gRPC deadline, see predict)
    ) -> None:
        """Stop serving `model`; returns once its queued requests have finished. See `Client.unload`."""
        request = _common.build_unload_request(model)
        with _common.rpc_errors():
            await self._oip.RepositoryModelUnload(
                request, timeout=_common.resolve_timeout(timeout, self.timeout), metadata=self._metadata
            )

    async def repository(self, *, ready: bool = False) -> list[RepositoryEntry]:
        """The server's repository index (with `ready`, only the versions that serve); see `Client.repository`."""
        request = _common.build_repository_request(ready=ready)
        with _common.rpc_errors():
            response = await self._oip.RepositoryIndex(request, timeout=self.timeout, metadata=self._metadata)
        return _common.parse_repository(response)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.address!r})"


async def _requests(
    config: stream_pb2.StreamRequest,
    frames: AsyncIterable[StreamFrame] | Iterable[StreamFrame],
    numberer: _common.FrameNumberer,
) -> AsyncIterator[stream_pb2.StreamRequest]:
    yield config
    try:
        if isinstance(frames, AsyncIterable):
            async for frame in frames:
                yield numberer.request(frame)
        else:
            for frame in frames:
                yield numberer.request(frame)
    except Exception as exc:  # runs in gRPC's writer task: hand it to the reader (see FrameNumberer)
        numberer.error = exc
