"""Per-call and per-request telemetry state, carried in context variables (no OpenTelemetry import here).

`RpcScope` lives for one RPC: the telemetry interceptor sets it, the request probe fills in what only the core
knows (model, version, request id, when the core was entered and left), and the interceptor reads it back when
the call ends. Tasks that a handler starts (a stream's frames) copy the context, so they see their call's scope.

`RequestTrace` is one traced request: its span, and what its batch recorded about it. It is the `tag` the probe
gives the batcher, so the batch's `infer` span can link to every traced member.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorgate.server.telemetry.metrics import Metrics

__all__ = ["MethodInfo", "RequestTrace", "RpcScope", "current_request", "current_scope"]


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """An RPC method, split the way the RPC semantic conventions name it."""

    #: "tensorgate.v1.Predict/Predict": the span name and the metrics' `rpc` label.
    name: str
    #: "tensorgate.v1.Predict"
    service: str
    #: "Predict"
    method: str
    #: Whether the client streams requests (one call, many inference requests).
    streaming: bool

    @classmethod
    def parse(cls, full_method: str, *, streaming: bool) -> MethodInfo:
        """From gRPC's "/package.Service/Method"."""
        name = full_method.lstrip("/")
        service, _, method = name.rpartition("/")
        return cls(name, service, method, streaming)


class RpcScope:
    """What telemetry knows about one RPC while it runs (see the module docstring)."""

    __slots__ = (
        "entered_ns",
        "info",
        "metrics",
        "model",
        "request_id",
        "returned_ns",
        "span",
        "started_ns",
        "version",
    )

    def __init__(self, info: MethodInfo, started_ns: int, metrics: Metrics | None) -> None:
        self.info = info
        #: time.time_ns() when the call arrived.
        self.started_ns = started_ns
        self.metrics = metrics
        #: The server span, when the call is traced (an OpenTelemetry Span).
        self.span: Any = None
        #: Set by the probe once the request is routed: the model and version that served it.
        self.model = ""
        self.version = ""
        self.request_id = ""
        #: time.time_ns() when a unary call's request entered and left the core (0: it never did).
        self.entered_ns = 0
        self.returned_ns = 0


class RequestTrace:
    """One traced inference request: its span, and its batch's id, size and engine window (set by the batch)."""

    __slots__ = ("batch_id", "batch_size", "infer_end_ns", "infer_start_ns", "request_id", "span")

    def __init__(self, span: Any, request_id: str) -> None:
        #: The request's own span: the server span of a unary call, the frame span of a stream's frame.
        self.span = span
        self.request_id = request_id
        self.batch_id = 0
        self.batch_size = 0
        self.infer_start_ns = 0
        self.infer_end_ns = 0


_scope: ContextVar[RpcScope | None] = ContextVar("tensorgate_rpc_scope", default=None)
_request: ContextVar[RequestTrace | None] = ContextVar("tensorgate_request_trace", default=None)
#: time.time_ns() when the current call reached the interceptor (the handler runs in the same context).
_arrival: ContextVar[int] = ContextVar("tensorgate_rpc_arrival", default=0)


def current_scope() -> RpcScope | None:
    """The scope of the RPC being served in this context; None outside one, or when telemetry is off."""
    return _scope.get()


def current_request() -> RequestTrace | None:
    """The traced request being served in this context, if it is traced."""
    return _request.get()
