"""The rate limit interceptor: each inference call takes a token from its client's bucket, or is refused.

The inference calls are `tensorgate.v1.Predict/Predict`, `tensorgate.v1.Stream/Stream`,
`inference.GRPCInferenceService/ModelInfer` and `.../ModelStreamInfer`; other calls (model listings, health,
repository changes) are not limited. A stream takes one token when it opens, not one per frame: a camera's frames
are paced by the stream's own drop policy and in-flight bound, and its results must not turn into errors at 30 fps.

The client is the value of the `key` metadata entry (e.g. `x-client-id`), else the peer's address without its port,
so opening new connections does not reset a client's bucket. The check runs in the handler, before the request
is decoded or queued; a refusal is a `ResourceExhaustedError` carrying the wait, which the error interceptor maps
to RESOURCE_EXHAUSTED with the retry hint. So this interceptor sits inside the error interceptor, and like it
returns the same wrapped handler for every call of a method (the error interceptor caches it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from tensorgate.server.overload.rate_limit import RateLimiter
from tensorgate.server.prechecks import with_precheck
from tensorgate.server.security.auth import certificate_identities

__all__ = ["INFERENCE_METHODS", "RateLimitInterceptor", "client_key"]

Context = grpc.aio.ServicerContext[Any, Any]

#: The calls that are rate limited.
INFERENCE_METHODS = frozenset(
    {
        "/tensorgate.v1.Predict/Predict",
        "/tensorgate.v1.Stream/Stream",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
    }
)
# A client id longer than this is cut: it is only a bucket's name, and buckets must stay small.
_MAX_KEY_CHARS = 256


def client_key(metadata: Any, peer: Callable[[], str], key: str, certificate: frozenset[str] = frozenset()) -> str:
    """The client a call counts against: "cert:<name>" for a verified client certificate (mTLS: an identity the
    client cannot choose), else "id:<value of the `key` entry>" (a label the client chooses), else
    "peer:<address without port>"."""
    if certificate:
        return "cert:" + min(certificate)[:_MAX_KEY_CHARS]
    for name, value in metadata or ():
        if name == key:
            text = value if isinstance(value, str) else bytes(value).hex()
            return "id:" + text[:_MAX_KEY_CHARS]
    address = peer() or "unknown"
    # "ipv4:10.0.0.1:5432" / "ipv6:[::1]:5432" -> without the port; "unix:/path" has none.
    if address.startswith(("ipv4:", "ipv6:")):
        address = address.rpartition(":")[0]
    return "peer:" + address


class RateLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Applies `limiter` to the calls in `methods`, per client (see the module docstring)."""

    def __init__(
        self, limiter: RateLimiter, *, key: str = "x-client-id", methods: frozenset[str] = INFERENCE_METHODS
    ) -> None:
        self.limiter = limiter
        self.key = key.lower()  # gRPC metadata names arrive lower-case
        self._methods = methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # Called once per method: the error interceptor outside caches what this returns.
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._methods:
            return handler
        return with_precheck(handler, self._check)

    def _check(self, context: Context) -> None:
        certificate = certificate_identities(context.auth_context())
        self.limiter.check(client_key(context.invocation_metadata(), context.peer, self.key, certificate))
