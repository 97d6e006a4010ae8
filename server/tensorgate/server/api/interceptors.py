"""The one map from the server's exceptions to gRPC status codes.

Handlers raise `TensorgateError`s; this interceptor turns each into its status code and message. Anything
else is a bug: it is logged with its traceback and the caller gets INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from tensorgate.server.errors import InvalidInputError, TensorgateError

__all__ = ["RETRY_AFTER_KEY", "RETRY_PUSHBACK_KEY", "ErrorInterceptor", "retry_hint"]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


#: The gRPC-standard trailer a client's retry policy honours (in milliseconds), and the HTTP-style one (seconds).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_AFTER_KEY = "retry-after"


def retry_hint(exc: TensorgateError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that tells the caller when a retry may succeed (empty when the error has no hint)."""
    if exc.retry_after is None:
        return ()
    seconds = max(0.0, exc.retry_after)
    return ((RETRY_PUSHBACK_KEY, str(math.ceil(seconds * 1000))), (RETRY_AFTER_KEY, str(math.ceil(seconds))))


async def _abort(context: Context, exc: Exception) -> None:
    if isinstance(exc, TensorgateError):
        hint = retry_hint(exc)
        if hint:
            await context.abort(grpc.StatusCode[exc.code], str(exc), trailing_metadata=hint)
        await context.abort(grpc.StatusCode[exc.code], str(exc))
    log.exception("unexpected error in a handler", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class _Undecodable:
    """Stands in for a request message that failed to parse.

    Left to gRPC, a parse failure becomes UNKNOWN with a logged traceback per call, and inside a stream it
    reaches the handler as a DecodeError; both would blame the server for what the client sent.
    """

    def __init__(self, error: DecodeError) -> None:
        self.error = InvalidInputError(f"the request message cannot be parsed: {error}")


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None
    deserialize = parse

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(exc)

    return tolerant


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error
        yield request


def _wrap_unary(
    behavior: Callable[[Any, Context], Awaitable[Any]],
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def unary(request: Any, context: Context) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise request.error
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)
            raise  # not reached: abort raises

    return unary


def _wrap_stream(
    behavior: Callable[[Any, Context], AsyncIterator[Any]],
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        try:
            if isinstance(requests, _Undecodable):  # the single request of a unary-stream call
                raise requests.error
            if hasattr(requests, "__aiter__"):  # the requests of a stream-stream call
                requests = _checked(requests)
            async for response in behavior(requests, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc)

    return stream


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps TensorgateError to its status code for methods under `prefixes` (our own services, and the Open
    Inference Protocol's `inference.` service).

    Wrapped handlers are cached per method: a cached call does not call `continuation` again. So interceptors
    inside this one (auth, overload) must do their per-call work in the handler they return, never in
    `intercept_service` itself.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("/tensorgate.", "/inference.")) -> None:
        self._prefixes = prefixes
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(self._prefixes):
            return handler
        wrapped = self._wrap(handler)
        self._wrapped[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        deserialize, serialize = _tolerant(handler.request_deserializer), handler.response_serializer
        # grpc-stubs types behaviours as sync callables; on a grpc.aio server they are coroutines and async
        # generators, which is what the wrappers take.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(cast(Any, handler.unary_unary)),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(cast(Any, handler.stream_stream)),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(cast(Any, handler.unary_stream)),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        return handler
