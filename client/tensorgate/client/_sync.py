"""`Client`: the blocking client. `AsyncClient` (in `_async`) has the same methods, as coroutines."""

from __future__ import annotations

import functools
import os
from collections.abc import Generator, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc
import numpy.typing as npt

from tensorgate.client import _common, _health, _tracing
from tensorgate.client._common import Inputs, ModelInfo, ModelMetadata, RepositoryEntry, StreamFrame, StreamResult
from tensorgate.client.frames import Preprocessing
from tensorgate.v1 import models_pb2, models_pb2_grpc, predict_pb2_grpc, stream_pb2, stream_pb2_grpc

if TYPE_CHECKING:  # imported on first use only (see `Client._oip`)
    from tensorgate.oip.grpc_service_pb2_grpc import GRPCInferenceServiceStub

__all__ = ["Client"]


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class Client:
    """A blocking client for a tensorgate server.

    Every failed call raises a `tensorgate.client.errors.TensorgateClientError` subclass. Use it as a context
    manager, or call `close()`; a client is safe to share between threads.

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
            self._channel = grpc.insecure_channel(settings.target, options=settings.options)
        else:
            self._channel = grpc.secure_channel(settings.target, settings.credentials, options=settings.options)
        self.address = address
        self.timeout = timeout
        self._fixed_metadata = settings.metadata or None
        self._predict = predict_pb2_grpc.PredictStub(self._channel)
        self._stream = stream_pb2_grpc.StreamStub(self._channel)
        self._models = models_pb2_grpc.ModelsStub(self._channel)
        # grpc-stubs leaves generic-call callables unparameterised; the (de)serializers fix the types.
        self._health_check: grpc.UnaryUnaryMultiCallable[str, str] = self._channel.unary_unary(
            _health.CHECK_METHOD,
            request_serializer=_health.encode_check_request,
            response_deserializer=_health.decode_check_response,
        )

    @property
    def _metadata(self) -> _tracing.Metadata | None:
        """Every call's metadata: the client's own, plus the caller's trace context when OpenTelemetry is installed."""
        return _tracing.outgoing(self._fixed_metadata)

    def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        outputs: Iterable[str] | None = None,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str = "",
    ) -> dict[str, npt.NDArray[Any]]:
        """Run one request through the model and return its outputs by name.

        Args:
            model: the model's name.
            inputs: arrays by input name (anything `numpy.asarray` accepts; dtypes are kept, not converted).
            version: the version to use; None lets the server choose (the highest ready one).
            outputs: the outputs to return; None returns all of them.
            priority: 1 is the highest; 0 takes the model's default.
            timeout: this call's deadline in seconds, queueing included; None uses the client's default.
            request_id: echoed in the server's logs and error messages; the server makes one up when empty.

        Returns:
            The output arrays. They are read-only views of the received bytes (no copy); `.copy()` one to
            modify it.
        """
        request = _common.build_predict_request(
            model, inputs, version=version, outputs=outputs, priority=priority, request_id=request_id
        )
        with _common.rpc_errors():
            response = self._predict.Predict(
                request, timeout=_common.resolve_timeout(timeout, self.timeout), metadata=self._metadata
            )
        return _common.parse_outputs(response.outputs)

    def stream(
        self,
        model: str,
        frames: Iterable[StreamFrame],
        *,
        version: int | None = None,
        outputs: Iterable[str] | None = None,
        policy: str | None = None,
        queue_size: int = 0,
        max_in_flight: int = 0,
        preprocessing: Preprocessing | None = None,
        timeout: float | None = None,
    ) -> Generator[StreamResult, None, None]:
        """Send frames over one bidirectional stream and yield their results, in frame order.

        Frames are numbered 0, 1, 2, ... in the order `frames` yields them, and are read from it as the stream
        can take them. The server reads every frame as it arrives and, when they come faster than the model
        serves them, drops frames per `policy`: a dropped frame gets no result, and the next result counts it
        in `dropped`. A frame the server rejects yields a result with `error` set, and the stream goes on.
        Leaving the loop early (or calling the generator's `close()`) cancels the stream. An exception raised
        by `frames` is re-raised here after the results of the frames sent before it.

        Args:
            model: the model's name.
            frames: each frame: its inputs by name, an `Image` (decoded and preprocessed on the server), or a
                `Frame` (tensors and/or image, and the capture time; other frames are stamped as sent).
            version: the version to use; None lets the server choose.
            outputs: the outputs to return; None returns all of them.
            policy: "latest" (the server's default when None): only the newest waiting frame is kept, for live
                cameras; "queue": up to `queue_size` frames wait, the oldest dropped when full; "block": up to
                `queue_size` frames wait, then the server stops reading and the sender waits; nothing is dropped
                (for files, and whenever every frame needs its result).
            queue_size: frames that may wait under "queue" and "block" (0: the server's default, 8).
            max_in_flight: frames being decoded, queued in the model or run at once (0: the server's default,
                1 under "latest", else 4).
            preprocessing: how the server turns `Image` frames into the model's input; None leaves it to the
                model's config and the input's shape.
            timeout: a deadline for the whole stream in seconds; None (the default) sets none, as a stream
                lives as long as its source. The client's default timeout does not apply.
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
                for response in call:
                    yield _common.parse_stream_response(response)
        except Exception:
            if numberer.error is not None:
                raise numberer.error from None
            raise
        finally:
            # grpc-stubs leaves RpcContext.cancel unannotated; it is `() -> bool` in grpc's documentation.
            cast(_Cancellable, call).cancel()  # a no-op once the call has finished
        if numberer.error is not None:
            raise numberer.error

    def models(self) -> list[ModelInfo]:
        """Every model the server knows, with each version's state (also those not ready, with the reason)."""
        with _common.rpc_errors():
            response = self._models.List(models_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata)
        return _common.parse_models(response)

    def metadata(self, model: str, *, version: int | None = None) -> ModelMetadata:
        """A model version's inputs, outputs and engine; None asks for the version the server would choose."""
        request = _common.build_metadata_request(model, version=version)
        with _common.rpc_errors():
            response = self._models.Metadata(request, timeout=self.timeout, metadata=self._metadata)
        return _common.parse_metadata(response)

    def ready(self, model: str, *, version: int | None = None) -> bool:
        """Whether the model (that version, or with None any version) can take requests now.

        Raises NotFoundError for a model the server does not know; a version it does not know is not ready.
        """
        request = _common.build_ready_request(model, version=version)
        with _common.rpc_errors():
            response = self._models.Ready(request, timeout=self.timeout, metadata=self._metadata)
        return response.ready

    def health(self, service: str = "") -> str:
        """The standard gRPC health status of the server ("") or of one service, e.g. "SERVING".

        Raises NotFoundError when the server does not know the service name.
        """
        with _common.rpc_errors():
            return self._health_check(service, timeout=self.timeout, metadata=self._metadata)

    @functools.cached_property
    def _oip(self) -> GRPCInferenceServiceStub:
        # The Open Inference Protocol's stubs are imported on first use: they cannot share a process with
        # tritonclient's (see _common.build_load_request), and only the repository methods need them.
        from tensorgate.oip import grpc_service_pb2_grpc

        return grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def load(self, model: str, *, timeout: float | None = None) -> list[RepositoryEntry]:
        """Load the model directory `model` of the server's repository, or reload it when it is loaded already.

        Returns once the model serves, with its entries of the repository index (one per version; a version that
        failed to reload shows its reason, and its previous load keeps serving). The server's `auth_token` or
        `admin_identities` guard this call: give the client a `token` or a client certificate.

        Args:
            model: the model's name, its directory in the server's repository.
            timeout: this call's deadline in seconds, loading and warming up included; None uses the client's
                default.

        Raises:
            NotFoundError: the repository has no such directory.
            InvalidArgumentError: no version could be loaded, or the name is not a directory name; the message
                gives the server's reason. A model that was serving keeps serving.
            UnauthenticatedError: no credentials were sent. PermissionDeniedError: they are not allowed.
        """
        request = _common.build_load_request(model)
        deadline = _common.resolve_timeout(timeout, self.timeout)
        with _common.rpc_errors():
            self._oip.RepositoryModelLoad(request, timeout=deadline, metadata=self._metadata)
            index = self._oip.RepositoryIndex(
                _common.build_repository_request(), timeout=deadline, metadata=self._metadata
            )
        return _common.parse_repository(index, model=model)

    def unload(self, model: str, *, timeout: float | None = None) -> None:
        """Stop serving `model`; returns once its queued requests have finished and its engines are freed.

        New requests for it get UnavailableError at once. It stays listed (state "UNAVAILABLE", reason
        "unloaded") until loaded again. Guarded like `load`; raises NotFoundError for a model the server does not
        know, UnauthenticatedError / PermissionDeniedError for missing or refused credentials.
        """
        request = _common.build_unload_request(model)
        with _common.rpc_errors():
            self._oip.RepositoryModelUnload(
                request, timeout=_common.resolve_timeout(timeout, self.timeout), metadata=self._metadata
            )

    def repository(self, *, ready: bool = False) -> list[RepositoryEntry]:
        """The server's repository index: one entry per model version (and one per model without a loaded
        version, e.g. unloaded), with its state and reason; with `ready`, only the versions that serve."""
        request = _common.build_repository_request(ready=ready)
        with _common.rpc_errors():
            response = self._oip.RepositoryIndex(request, timeout=self.timeout, metadata=self._metadata)
        return _common.parse_repository(response)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"


def _requests(
    config: stream_pb2.StreamRequest, frames: Iterable[StreamFrame], numberer: _common.FrameNumberer
) -> Iterator[stream_pb2.StreamRequest]:
    yield config
    try:
        for frame in frames:
            yield numberer.request(frame)
    except Exception as exc:  # runs on gRPC's thread: hand it to the caller's thread (see FrameNumberer)
        numberer.error = exc
