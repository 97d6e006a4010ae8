"""Clocks for the batcher: the real monotonic one, and a fake one whose time moves only when a test says so.

The batcher never reads the time or sleeps except through a `Clock`, so its timing rules (queue delay,
deadlines) can be tested in microseconds, deterministically, with `FakeClock`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """A monotonic time source, and a way to wait for an event until a time on it."""

    def now(self) -> float:
        """The current time in seconds. Only differences mean anything."""
        ...

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        """Wait until `event` is set or the clock reaches `deadline` (`None`: no time limit).

        Returns True if the event is set, False if the deadline came first. Returns at once when the event is
        already set or the deadline has already passed.
        """
        ...


class MonotonicClock:
    """`time.monotonic()`, with timed waits on the event loop's own timer (no polling, no extra tasks)."""

    __slots__ = ()

    def now(self) -> float:
        """`time.monotonic()`."""
        return time.monotonic()

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        """See `Clock.wait`."""
        if event.is_set():
            return True
        if deadline is None:
            await event.wait()
            return True
        delay = deadline - time.monotonic()
        if delay <= 0:
            return False
        # asyncio.timeout schedules one timer handle; asyncio.wait_for would create a task per wait.
        try:
            async with asyncio.timeout(delay):
                await event.wait()
        except TimeoutError:
            # The event may have been set in the same loop iteration as the timer fired; report what is true.
            return event.is_set()
        return True


class FakeClock:
    """A clock for tests: time stands still until `advance()` moves it.

    `advance()` wakes every `wait()` whose deadline it reaches (they resume on the next turns of the event
    loop; the test yields, e.g. `await asyncio.sleep(0)` a few times, to let them run). `wait_calls` counts
    timed and untimed waits, so a test can prove that nothing polls.
    """

    __slots__ = ("_now", "_timers", "wait_calls")

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        # (deadline, timeout scope) of every wait in progress with a deadline.
        self._timers: list[tuple[float, asyncio.Timeout]] = []
        self.wait_calls = 0

    def now(self) -> float:
        """The fake time."""
        return self._now

    @property
    def timed_waiters(self) -> int:
        """How many waits with a deadline are in progress."""
        return len(self._timers)

    def next_deadline(self) -> float | None:
        """The earliest deadline any wait in progress has, or None."""
        return min((when for when, _ in self._timers), default=None)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the waits whose deadline it reaches. Call it inside the event loop."""
        if seconds < 0:
            raise ValueError("a monotonic clock never goes back")
        self._now += seconds
        due = [timer for timer in self._timers if timer[0] <= self._now]
        if not due:
            return
        self._timers = [timer for timer in self._timers if timer[0] > self._now]
        loop = asyncio.get_running_loop()
        for _, scope in due:
            # Expire the scope on the next loop turn: the waiting task gets TimeoutError from its own scope.
            scope.reschedule(loop.time())

    async def wait(self, event: asyncio.Event, deadline: float | None) -> bool:
        """See `Clock.wait`."""
        self.wait_calls += 1
        if event.is_set():
            return True
        if deadline is None:
            await event.wait()
            return True
        if deadline <= self._now:
            return False
        try:
            async with asyncio.timeout(None) as scope:
                timer = (deadline, scope)
                self._timers.append(timer)
                try:
                    await event.wait()
                finally:
                    if timer in self._timers:
                        self._timers.remove(timer)
        except TimeoutError:
            return event.is_set()
        return True
