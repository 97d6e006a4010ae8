"""The telemetry interceptor: per call, the server span, the request counter and latency, and the access log.

It is ours rather than opentelemetry-instrumentation-grpc's, whose aio server interceptor breaks streaming handlers
(FACTS.md). Streams are traced here too: one span for the whole call, and per-frame spans made by the request
probe. Only our services (`/tensorgate.`, `/inference.`) go through it; health and reflection never do.

It sits outside the error interceptor, so it sees what the caller sees: a handler's `TensorgateError` has become
an abort with its status code by the time it gets here, and each call is counted once, under that code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc

from tensorgate.server.repository import Repository
from tensorgate.server.telemetry.context import MethodInfo, RpcScope, _arrival, _scope
from tensorgate.server.telemetry.logging import ACCESS_LOGGER

if TYPE_CHECKING:
    from tensorgate.server.telemetry.metrics import Metrics
    from tensorgate.server.telemetry.tracing import Tracing

__all__ = ["TelemetryInterceptor"]

access_log = logging.getLogger(ACCESS_LOGGER)

Context = grpc.aio.ServicerContext[Any, Any]


_NS = 1e-9
_CODE_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}


def _status(context: Context) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class TelemetryInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Traces, counts and logs every call of our own services (see the module docstring).

    Wrapped handlers are cached per method, like the error interceptor's, so this must sit outside it.
    """

    def __init__(
        self,
        repository: Repository,
        *,
        tracing: Tracing | None,
        metrics: Metrics | None,
        access_log: bool,
        prefixes: tuple[str, ...] = ("/tensorgate.", "/inference."),
    ) -> None:
        self._repository = repository
        self._tracing = tracing
        self._metrics = metrics
        self._access_log = access_log
        self._prefixes = prefixes
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._gauges: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        # The handler runs in this call's context; the time it arrived is where its span starts.
        _arrival.set(time.time_ns())
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(self._prefixes):
            return handler
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        # grpc-stubs types behaviours as sync callables; on a grpc.aio server they are coroutines and async
        # generators (the error interceptor has made every streaming one an async generator).
        if handler.unary_unary is not None:
            info = MethodInfo.parse(method, streaming=False)
            return grpc.unary_unary_rpc_method_handler(
                self._unary(info, cast(Any, handler.unary_unary)),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        if handler.stream_stream is not None:
            info = MethodInfo.parse(method, streaming=True)
            return grpc.stream_stream_rpc_method_handler(
                self._stream(info, cast(Any, handler.stream_stream)),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        if handler.unary_stream is not None:
            info = MethodInfo.parse(method, streaming=True)
            return grpc.unary_stream_rpc_method_handler(
                self._stream(info, cast(Any, handler.unary_stream)),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        return handler

    def _begin(self, info: MethodInfo, context: Context) -> RpcScope | None:
        """The call's scope; None when there is nothing to record (tracing alone, and the call not sampled)."""
        started = _arrival.get() or time.time_ns()
        span = None
        if self._tracing is not None:
            span = self._tracing.start_rpc_span(info, context.invocation_metadata(), context.peer, started)
            if span is None and self._metrics is None and not self._access_log:
                return None
        scope = RpcScope(info, started, self._metrics)
        scope.span = span
        if self._metrics is not None:
            self._in_flight(info.name).inc()
        return scope

    def _in_flight(self, rpc: str) -> Any:
        """The in-flight gauge of one method (looked up once per method)."""
        gauge = self._gauges.get(rpc)
        if gauge is None and self._metrics is not None:
            gauge = self._gauges[rpc] = self._metrics.in_flight(rpc)
        return gauge

    def _unary(
        self, info: MethodInfo, behavior: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def unary(request: Any, context: Context) -> Any:
            scope = self._begin(info, context)
            if scope is None:
                return await behavior(request, context)
            token = _scope.set(scope)
            code = "OK"
            try:
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = _status(context)
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                self._finish(scope, request, context, code)
                _scope.reset(token)

        return unary

    def _stream(
        self, info: MethodInfo, behavior: Callable[[Any, Context], AsyncIterator[Any]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def stream(requests: Any, context: Context) -> AsyncIterator[Any]:
            scope = self._begin(info, context)
            if scope is None:
                async for response in behavior(requests, context):
                    yield response
                return
            # Set, not reset later: an async generator may be finalised in another context, where a reset token
            # is refused; the call's task, and this context with it, ends with the call.
            _scope.set(scope)
            code = "OK"
            try:
                async for response in behavior(requests, context):
                    yield response
            except grpc.aio.AbortError:
                code = _status(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            except BaseException:
                code = "UNKNOWN"
                raise
            finally:
                self._finish(scope, requests, context, code)
                _scope.set(None)

        return stream

    def _model_label(self, scope: RpcScope, request: Any) -> str:
        """The routed model, else the model the request names if the repository knows it, else ""."""
        if scope.model:
            return scope.model
        for field in ("model", "model_name", "name"):
            name = getattr(request, field, None)
            if isinstance(name, str) and name:
                try:
                    self._repository.model(name)
                except Exception:
                    return ""
                return name
        return ""

    def _finish(self, scope: RpcScope, request: Any, context: Context, code: str) -> None:
        end = time.time_ns()
        info = scope.info
        model = self._model_label(scope, request)
        metrics, tracing = self._metrics, self._tracing
        inferred = scope.entered_ns and scope.returned_ns  # a unary call whose request went through the core
        answered = inferred and code == "OK"  # ...and whose response was built
        if metrics is not None:
            self._in_flight(info.name).dec()
            seconds = None if info.streaming else (end - scope.started_ns) * _NS
            metrics.call_finished(model, scope.version, info.name, code, seconds)
            if answered:
                stages = metrics.stages(model, scope.version)
                stages.decode.observe((scope.entered_ns - scope.started_ns) * _NS)
                stages.encode.observe((end - scope.returned_ns) * _NS)
        span = scope.span
        if span is not None and tracing is not None:
            if inferred:
                tracing.record("decode", span, scope.started_ns, scope.entered_ns)
            if answered:
                tracing.record("encode", span, scope.returned_ns, end)
            if model:
                span.set_attribute("tensorgate.model", model)
            details = context.details() if code != "OK" else None
            tracing.end_rpc_span(span, code, _CODE_NUMBERS.get(code, 2), details, end)
        if self._access_log:
            trace_id = span_id = ""
            if span is not None:
                span_context = span.get_span_context()
                trace_id, span_id = format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")
            duration_ms = round((end - scope.started_ns) / 1e6, 3)
            access_log.info(
                "%s %s %s %.3fms",
                context.peer(),
                info.name,
                code,
                duration_ms,
                extra={
                    "rpc": info.name,
                    "code": code,
                    "duration_ms": duration_ms,
                    "peer": context.peer(),
                    "model": model,
                    "version": scope.version,
                    "request_id": scope.request_id,
                    "trace_id": trace_id,
                    "span_id": span_id,
                },
            )
