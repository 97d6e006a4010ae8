"""Wrapping a gRPC method handler so that a check runs before its behaviour, for every kind of method.

The auth and the rate-limit interceptors both refuse calls before any work: each gives its check here, and the
check raises one of the server's errors (mapped to a status code by the error interceptor outside them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc

__all__ = ["Check", "Context", "with_precheck"]

Context = grpc.aio.ServicerContext[Any, Any]
#: Raises to refuse the call; returns to let it through.
Check = Callable[[Context], None]


def with_precheck(handler: grpc.RpcMethodHandler[Any, Any], check: Check) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with `check(context)` run first on every call, whichever of the four kinds of method it is."""
    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    # grpc-stubs types behaviours as sync callables; on a grpc.aio server they are coroutines and async generators.
    if handler.unary_unary is not None or handler.stream_unary is not None:
        single = cast(Callable[[Any, Context], Awaitable[Any]], handler.unary_unary or handler.stream_unary)

        async def checked_single(request: Any, context: Context) -> Any:
            check(context)
            return await single(request, context)

        make_single = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )
        return make_single(checked_single, request_deserializer=deserialize, response_serializer=serialize)
    stream = cast(Callable[[Any, Context], AsyncIterator[Any]], handler.stream_stream or handler.unary_stream)

    async def checked_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
        check(context)
        async for response in stream(requests, context):
            yield response

    make_stream = (
        grpc.stream_stream_rpc_method_handler
        if handler.stream_stream is not None
        else grpc.unary_stream_rpc_method_handler
    )
    return make_stream(cast(Any, checked_stream), request_deserializer=deserialize, response_serializer=serialize)
