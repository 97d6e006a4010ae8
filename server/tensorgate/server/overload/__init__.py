"""Overload protection: per-client rate limits, circuit breakers per model version, per-request limits.

- `RateLimiter`: token buckets per client; `tensorgate.server.overload.interceptor.RateLimitInterceptor` applies
  it to the inference calls (imported from there: it needs grpc, and this package's core parts do not).
- `Breakers` / `CircuitBreaker`: take a model version whose engine keeps failing out of rotation, then try it
  again after a cool-down (used by `tensorgate.server.inference`).
- `Limits`: tensor elements, rows per request, stream frame size.
- `Overload`: all of the above as the server's settings ask, for the server to wire in.
"""

from __future__ import annotations

from tensorgate.server.overload.breaker import (
    BreakerListener,
    Breakers,
    BreakerState,
    CircuitBreaker,
    Ticket,
    Timer,
    loop_timer,
)
from tensorgate.server.overload.controls import Overload
from tensorgate.server.overload.limits import Limits, TensorHeader
from tensorgate.server.overload.rate_limit import DEFAULT_MAX_CLIENTS, RateLimiter

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "BreakerListener",
    "BreakerState",
    "Breakers",
    "CircuitBreaker",
    "Limits",
    "Overload",
    "RateLimiter",
    "TensorHeader",
    "Ticket",
    "Timer",
    "loop_timer",
]
