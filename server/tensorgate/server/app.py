"""The grpc.aio server: our services, health, reflection, and a clean drain on stop."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs predate aio
from grpc_reflection.v1alpha import reflection

from tensorgate.oip import grpc_service_pb2, grpc_service_pb2_grpc
from tensorgate.server.addresses import split_address
from tensorgate.server.api.codec import RequestIds
from tensorgate.server.api.interceptors import ErrorInterceptor
from tensorgate.server.api.models import ModelsServicer
from tensorgate.server.api.oip import InferenceServicer
from tensorgate.server.api.predict import PredictServicer
from tensorgate.server.api.stream import StreamServicer
from tensorgate.server.inference import InferenceService
from tensorgate.server.overload import BreakerState, CircuitBreaker, Overload
from tensorgate.server.repository import Repository, RepositorySettings
from tensorgate.server.security import ServerSecurity
from tensorgate.server.settings import ServerSettings
from tensorgate.server.streams import StreamRegistry
from tensorgate.server.telemetry import Telemetry
from tensorgate.v1 import (
    models_pb2,
    models_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)

__all__ = ["Server"]

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    predict_pb2.DESCRIPTOR.services_by_name["Predict"].full_name,
    stream_pb2.DESCRIPTOR.services_by_name["Stream"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["Models"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


class Server:
    """tensorgate's gRPC server over one model repository.

    `start()` loads every model, binds the address and starts serving; `stop()` drains: health turns
    NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get `grace` seconds to finish.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        #: TLS for the port and the access policy; ValueError (naming the setting and path) for bad ones.
        self.security = ServerSecurity.from_settings(settings)
        #: Tracing, metrics and the access log, as the settings ask (ValueError for nonsensical ones).
        self.telemetry = Telemetry(settings)
        self.repository = Repository(
            settings.repository,
            RepositorySettings(
                max_queue_size=settings.max_queue_size,
                default_max_batch_size=settings.default_max_batch_size,
                intra_op_threads=settings.intra_op_threads,
                plan_cache_dir=Path(settings.plan_cache) if settings.plan_cache else None,
                settle_seconds=settings.repository_settle,
                watch=settings.watch_repository,
            ),
            instrumentation=self.telemetry.instrumentation,
        )
        # Rescans (signals, file changes) and repository RPCs change models while serving: health follows.
        self.repository.add_listener(self._publish_model_health)
        self.health = health_aio.HealthServicer()
        #: Rate limit, circuit breakers and per-request limits, as the settings ask (ValueError for bad ones).
        self.overload = Overload.from_settings(settings, listener=self._breaker_changed)
        self._health_tasks: set[asyncio.Task[None]] = set()
        #: The open streams of the Stream service, and the stream limit.
        self.streams = StreamRegistry(settings.max_streams)
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self._draining = False

    async def start(self) -> str:
        """Load the repository, bind, start serving; return the bound HOST:PORT (the real port for port 0)."""
        host, _ = split_address(self.settings.address)
        await self.repository.load()
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            # Innermost last: the error interceptor caches handlers (see its docstring). Telemetry sits outside it,
            # so it sees each call's final status code. The auth interceptor sits inside it, so that its refusals
            # are mapped there; it does its per-call work in the handler, which the cache allows.
            interceptors=[
                *filter(None, [self.telemetry.interceptor(self.repository)]),
                ErrorInterceptor(),
                self.security.interceptor(),
                *filter(None, [self.overload.interceptor()]),  # after auth: refused calls take no token
            ],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # A stale server on the same port must not silently share our traffic (FACTS.md); only the
                # processes of `--workers N` share it on purpose (tensorgate.server.workers).
                ("grpc.so_reuseport", 1 if self.settings.workers > 1 else 0),
                *self.overload.server_options,
            ],
            maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs or None,
        )
        service = InferenceService(
            self.repository, self.telemetry.probe, limits=self.overload.limits, breakers=self.overload.breakers
        )
        request_ids = RequestIds()
        predict_pb2_grpc.add_PredictServicer_to_server(PredictServicer(service, request_ids), server)
        stream_pb2_grpc.add_StreamServicer_to_server(
            StreamServicer(service, request_ids, registry=self.streams), server
        )
        models_pb2_grpc.add_ModelsServicer_to_server(ModelsServicer(self.repository), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(
                service,
                request_ids,
                serving=lambda: not self._draining,
                model_changed=self._publish_model_health,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = self.security.add_port(server, self.settings.address)
        if port == 0:
            raise OSError(f"cannot listen on {self.settings.address}")
        self.security.log_warnings()
        try:
            self.telemetry.start(self.repository, host, port)
        except BaseException:
            self.telemetry.stop()
            raise
        await server.start()
        self._server = server
        self.address = f"{host}:{port}"
        await self._publish_health()
        return self.address

    async def _publish_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving)
        for name in SERVICE_NAMES:
            await self.health.set(name, serving)
        for entry in self.repository.models():
            await self.health.set(entry.name, serving if self.overload.serving(entry) else not_serving)

    async def _publish_model_health(self, name: str) -> None:
        """One model's health status, after it was loaded, reloaded, unloaded or removed."""
        ready = any(self.overload.serving(entry) for entry in self.repository.models() if entry.name == name)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, status)

    def _breaker_changed(self, breaker: CircuitBreaker, state: BreakerState) -> None:
        """A model version went out of or back into rotation: its gauge, and its model's health (on the loop)."""
        if self.telemetry.metrics is not None:
            self.telemetry.metrics.breaker_state(breaker.model, str(breaker.version)).value = state.value
        if not self._draining:
            task = asyncio.get_running_loop().create_task(self._publish_model_health(breaker.model))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` seconds."""
        grace = self.settings.grace_period if grace is None else grace
        self._draining = True
        started = time.monotonic()
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        # Queued batches normally finish at once (their calls ended with the gRPC server). A hung engine would
        # hold the drain forever: past the grace period, running batches are cancelled and their engines left to
        # the process exit. At least a second, so a grace of 0 still lets finished batches be handed back.
        remaining = max(grace - (time.monotonic() - started), 1.0)
        try:
            await asyncio.wait_for(self.repository.close(drain=True), remaining)
        except TimeoutError:
            log.warning("batches still running after the grace period (%.1f s) were abandoned", grace)
        self.telemetry.stop()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Return when the server has stopped."""
        if self._server is not None:
            await self._server.wait_for_termination()
