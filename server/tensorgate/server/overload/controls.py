"""`Overload`: the server's overload settings turned into the parts the server wires in.

Built once from `ServerSettings` (ValueError naming the setting for a nonsensical value, so the server refuses to
start rather than run without the protection asked for). Parts that are off are None and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensorgate.server.overload.breaker import BreakerListener, Breakers, loop_timer
from tensorgate.server.overload.limits import Limits
from tensorgate.server.overload.rate_limit import RateLimiter
from tensorgate.server.repository import ModelEntry
from tensorgate.server.settings import ServerSettings

if TYPE_CHECKING:
    from tensorgate.server.overload.interceptor import RateLimitInterceptor

__all__ = ["Overload"]


@dataclass(frozen=True, slots=True)
class Overload:
    """Per-request limits, circuit breakers (None: off), the rate limiter (None: off) and gRPC server options."""

    limits: Limits
    breakers: Breakers | None
    rate_limiter: RateLimiter | None
    rate_limit_key: str
    server_options: tuple[tuple[str, Any], ...]

    @classmethod
    def from_settings(cls, settings: ServerSettings, *, listener: BreakerListener | None = None) -> Overload:
        """The parts `settings` ask for; `listener` is told of every breaker's change of state."""
        for name in ("breaker_failures", "breaker_cooldown", "rate_limit", "max_streams_per_connection"):
            if getattr(settings, name) < 0:
                raise ValueError(f"setting {name!r} must be >= 0, got {getattr(settings, name)}")
        try:
            limits = Limits(
                max_tensor_elements=settings.max_tensor_elements,
                max_request_rows=settings.max_request_rows,
                max_frame_bytes=settings.max_frame_bytes,
            )
            breakers = None
            if settings.breaker_failures:
                breakers = Breakers(
                    failures=settings.breaker_failures,
                    cooldown=settings.breaker_cooldown,
                    listener=listener,
                    timer=loop_timer,
                )
            limiter = RateLimiter(settings.rate_limit, settings.rate_limit_burst) if settings.rate_limit else None
        except ValueError as exc:
            raise ValueError(f"overload settings: {exc}") from None
        if settings.rate_limit and not settings.rate_limit_key.strip():
            raise ValueError("setting 'rate_limit_key' must name a metadata entry")
        options: tuple[tuple[str, Any], ...] = ()
        if settings.max_streams_per_connection:
            # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: the client's transport holds further calls until one ends.
            options = (("grpc.max_concurrent_streams", settings.max_streams_per_connection),)
        return cls(limits, breakers, limiter, settings.rate_limit_key.strip().lower(), options)

    def interceptor(self) -> RateLimitInterceptor | None:
        """The rate limit interceptor (inside the error interceptor), or None when there is no rate limit."""
        if self.rate_limiter is None:
            return None
        from tensorgate.server.overload.interceptor import RateLimitInterceptor  # grpc: only where served

        return RateLimitInterceptor(self.rate_limiter, key=self.rate_limit_key)

    def serving(self, entry: ModelEntry) -> bool:
        """Whether the model's health says SERVING: ready, and no ready version out of rotation."""
        return entry.ready and (self.breakers is None or self.breakers.serving(entry))
