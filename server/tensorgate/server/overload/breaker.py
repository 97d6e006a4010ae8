"""Circuit breakers, one per model version: a version whose engine keeps failing is taken out of rotation.

States and moves (`BreakerState`):

- CLOSED: requests flow. Each batch the engine fails (EngineFailedError, INTERNAL) counts once; a success resets
  the count. `failures` consecutive failed batches open the breaker.
- OPEN: every request is refused at once with UNAVAILABLE and a retry hint (the cool-down left), so clients back
  off instead of queueing behind a broken engine. After `cooldown` seconds it turns HALF_OPEN.
- HALF_OPEN: one trial request is let through; others are refused (UNAVAILABLE, a short hint) while it runs. The
  trial's success closes the breaker, an engine failure re-opens it for another cool-down; a trial that ends
  otherwise (deadline, cancelled, queue full) decides nothing, and the next request becomes the trial.

Failures are counted per failed batch, not per request: one bad batch of 8 requests is one failure, so a single
transient fault on a busy model does not take it out of rotation (the requests of a batch share the engine's
exception, which is how they are told apart from the next batch's). Outcomes of
requests admitted before the last change of state are ignored, so a slow request from before cannot close or
re-open the breaker. Each change is logged and handed to a listener (the server publishes the model's health
and a gauge). With a `timer`, a breaker turns HALF_OPEN when its cool-down ends even without traffic, so a health
checking balancer sees the version come back and sends the trial; without one (unit tests on a fake clock) it
turns when asked.

Nothing here imports grpc: the core's request path (`tensorgate.server.inference`) uses it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import weakref
from collections.abc import Callable
from typing import Any

from tensorgate.server.batching.clock import Clock, MonotonicClock
from tensorgate.server.errors import UnavailableError
from tensorgate.server.repository import ModelEntry, ModelVersion

__all__ = ["BreakerListener", "BreakerState", "Breakers", "CircuitBreaker", "Ticket", "Timer", "loop_timer"]

log = logging.getLogger(__name__)

#: What `admit` hands out and the outcome calls take back: (the breaker's generation then, whether it is the trial).
Ticket = tuple[int, bool]
#: Told of every change of state, on the event loop.
BreakerListener = Callable[["CircuitBreaker", "BreakerState"], None]
#: Calls `callback` after `delay` seconds (on the event loop); see `loop_timer`.
Timer = Callable[[float, Callable[[], None]], Any]

#: Most seconds a request refused during a trial is told to wait: a trial takes about one batch.
_TRIAL_RETRY_AFTER = 0.1


class BreakerState(enum.Enum):
    """A breaker's state; the value is what the `tensorgate_breaker_state` gauge shows."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


def loop_timer(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
    """A `Timer` on the running event loop (`loop.call_later`)."""
    return asyncio.get_running_loop().call_later(delay, callback)


class CircuitBreaker:
    """The breaker of one model version (see the module docstring). Used only on the event loop.

    `admit()` before a request goes to the batcher (UnavailableError when it may not), then exactly one of
    `succeeded`, `failed` (the engine failed it) or `release` (any other ending) with the ticket `admit` gave.
    """

    def __init__(
        self,
        model: str,
        version: int,
        *,
        failures: int,
        cooldown: float,
        clock: Clock | None = None,
        listener: BreakerListener | None = None,
        timer: Timer | None = None,
    ) -> None:
        if failures < 1:
            raise ValueError(f"a breaker needs failures >= 1, got {failures}")
        if cooldown < 0:
            raise ValueError(f"breaker cooldown must be >= 0 seconds, got {cooldown}")
        self.model = model
        self.version = version
        self.threshold = failures
        self.cooldown = cooldown
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._listener = listener
        self._timer = timer
        self._state = BreakerState.CLOSED
        self._failures = 0
        # Bumped on every change of state: tickets from an older generation decide nothing.
        self._generation = 0
        self._reopen_at = 0.0
        self._trial_running = False
        # The batch (its engine exception) last counted, so that its other requests do not count again.
        self._last_failed_batch: object = None

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.model!r}, {self.version}, {self._state.name}, failures={self._failures})"

    @property
    def label(self) -> str:
        """The version as messages name it: model 'name' version N."""
        return f"model {self.model!r} version {self.version}"

    @property
    def state(self) -> BreakerState:
        """The current state (an OPEN breaker whose cool-down is over turns HALF_OPEN here)."""
        self._refresh()
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive engine failures counted while CLOSED (the count that opened it, while OPEN)."""
        return self._failures

    def retry_after(self) -> float:
        """Seconds until a request may get through: the cool-down left while OPEN, a trial's time while HALF_OPEN."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._reopen_at - self._clock.now())
        if state is BreakerState.HALF_OPEN and self._trial_running:
            return min(self.cooldown, _TRIAL_RETRY_AFTER)
        return 0.0

    def admit(self) -> Ticket:
        """Let a request through, or raise UnavailableError (with its retry hint) while out of rotation."""
        if self._state is BreakerState.CLOSED:  # the hot path: one comparison
            return (self._generation, False)
        self._refresh()
        if self._state is BreakerState.OPEN:
            wait = self.retry_after()
            raise UnavailableError(
                f"{self.label} is out of rotation after {self._failures} consecutive engine failures; "
                f"a trial request goes through in {wait:.3g} s",
                retry_after=wait,
            )
        # HALF_OPEN (refreshing an OPEN breaker never closes it)
        if self._trial_running:
            raise UnavailableError(
                f"{self.label} is out of rotation while a trial request checks its engine",
                retry_after=self.retry_after(),
            )
        self._trial_running = True
        return (self._generation, True)

    def succeeded(self, ticket: Ticket) -> None:
        """The admitted request got its result."""
        generation, trial = ticket
        if generation != self._generation:
            return
        if self._state is BreakerState.CLOSED:
            self._failures = 0
        elif trial and self._state is BreakerState.HALF_OPEN:
            self._failures = 0
            self._change(BreakerState.CLOSED)

    def failed(self, ticket: Ticket, batch: object = None) -> None:
        """The engine failed the admitted request (EngineFailedError). `batch` identifies the failed batch (the
        engine's exception, shared by its requests): the requests of one batch count as one failure."""
        generation, trial = ticket
        if generation != self._generation:
            return
        if batch is not None and batch is self._last_failed_batch:
            return
        self._last_failed_batch = batch
        if self._state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.threshold:
                self._open()
        elif trial and self._state is BreakerState.HALF_OPEN:
            self._open()

    def release(self, ticket: Ticket) -> None:
        """The admitted request ended without a verdict on the engine (refused, expired, cancelled)."""
        generation, trial = ticket
        if trial and generation == self._generation and self._state is BreakerState.HALF_OPEN:
            self._trial_running = False  # the next request becomes the trial

    def _open(self) -> None:
        self._reopen_at = self._clock.now() + self.cooldown
        self._change(BreakerState.OPEN)
        if self._timer is not None:
            self._timer(self.cooldown, self._wake)

    def _wake(self) -> None:
        self._refresh()
        if self._state is BreakerState.OPEN and self._timer is not None:
            # Timers may fire a little early; a later re-open has scheduled its own wake-up, so one here is spare.
            left = self._reopen_at - self._clock.now()
            if 0 < left <= self.cooldown:
                self._timer(left, self._wake)

    def _refresh(self) -> None:
        if self._state is BreakerState.OPEN and self._clock.now() >= self._reopen_at:
            self._change(BreakerState.HALF_OPEN)

    def _change(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._trial_running = False
        if state is BreakerState.OPEN:
            log.warning(
                "%s is out of rotation: %d consecutive engine failures; a trial request in %.3g s",
                self.label,
                self._failures,
                self.cooldown,
            )
        elif state is BreakerState.HALF_OPEN:
            log.info("%s: cool-down over, the next request is a trial", self.label)
        else:
            log.info("%s is back in rotation: the trial request succeeded", self.label)
        if self._listener is not None:
            self._listener(self, state)


class Breakers:
    """The breakers of every served model version, made on first use.

    A breaker belongs to one load of a version (its batcher): a version loaded again starts with a fresh, closed
    breaker, since its engine is new.
    """

    def __init__(
        self,
        *,
        failures: int,
        cooldown: float,
        clock: Clock | None = None,
        listener: BreakerListener | None = None,
        timer: Timer | None = None,
    ) -> None:
        CircuitBreaker("", 0, failures=failures, cooldown=cooldown)  # checks the settings now, not per request
        self._failures = failures
        self._cooldown = cooldown
        self._clock = clock
        self._listener = listener
        self._timer = timer
        # (model, version) -> (the batcher it belongs to, the breaker). Weak: an unloaded version's batcher goes.
        self._breakers: dict[tuple[str, int], tuple[weakref.ref[Any], CircuitBreaker]] = {}

    def breaker(self, target: ModelVersion) -> CircuitBreaker:
        """The breaker of a ready model version (one with a batcher)."""
        assert target.batcher is not None
        key = (target.name, target.version)
        found = self._breakers.get(key)
        if found is not None and found[0]() is target.batcher:
            return found[1]
        breaker = CircuitBreaker(
            target.name,
            target.version,
            failures=self._failures,
            cooldown=self._cooldown,
            clock=self._clock,
            listener=self._listener,
            timer=self._timer,
        )
        self._breakers[key] = (weakref.ref(target.batcher), breaker)
        if found is not None and found[1].state is not BreakerState.CLOSED and self._listener is not None:
            self._listener(breaker, BreakerState.CLOSED)  # the old load's breaker is gone with it
        return breaker

    def in_rotation(self, target: ModelVersion) -> bool:
        """Whether unpinned requests may be routed to `target`: False while its breaker is open."""
        found = self._breakers.get((target.name, target.version))
        return found is None or found[0]() is not target.batcher or found[1].state is not BreakerState.OPEN

    def serving(self, entry: ModelEntry) -> bool:
        """False while any ready version of the model is out of rotation (OPEN); its health says NOT_SERVING then."""
        for number, version in entry.versions.items():
            found = self._breakers.get((entry.name, number))
            if (
                found is not None
                and version.ready
                and found[0]() is version.batcher
                and found[1].state is BreakerState.OPEN
            ):
                return False
        return True

    def states(self) -> dict[tuple[str, int], BreakerState]:
        """Every breaker's state by (model, version)."""
        return {key: breaker.state for key, (_, breaker) in self._breakers.items()}
