"""The circuit breaker of a model version, on a fake clock: open, cool-down, one trial, close or re-open."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tensorgate.server.batching.clock import FakeClock
from tensorgate.server.errors import UnavailableError
from tensorgate.server.overload import Breakers, BreakerState, CircuitBreaker
from tensorgate.server.repository import ModelEntry, ModelVersion, VersionState

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


@dataclass
class Recorder:
    """Listener and timer: the changes announced, and the timers asked for (run by the test)."""

    changes: list[BreakerState] = field(default_factory=list)
    timers: list[tuple[float, Callable[[], None]]] = field(default_factory=list)

    def listener(self, breaker: CircuitBreaker, state: BreakerState) -> None:
        self.changes.append(state)

    def timer(self, delay: float, callback: Callable[[], None]) -> None:
        self.timers.append((delay, callback))


def make(
    failures: int = 3, cooldown: float = 10.0, *, timer: bool = False
) -> tuple[CircuitBreaker, FakeClock, Recorder]:
    clock, recorder = FakeClock(), Recorder()
    breaker = CircuitBreaker(
        "m",
        1,
        failures=failures,
        cooldown=cooldown,
        clock=clock,
        listener=recorder.listener,
        timer=recorder.timer if timer else None,
    )
    return breaker, clock, recorder


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.failed(breaker.admit())


def test_consecutive_failures_open_it() -> None:
    breaker, _, recorder = make(failures=3)
    fail(breaker, 2)
    assert breaker.state is CLOSED
    fail(breaker)
    assert breaker.state is OPEN
    assert recorder.changes == [OPEN]


def test_the_requests_of_one_failed_batch_count_once() -> None:
    breaker, _, _ = make(failures=3)
    one_batch, other_batch = RuntimeError("batch 1"), RuntimeError("batch 2")
    tickets = [breaker.admit() for _ in range(8)]  # eight requests that ran in the same batch
    for ticket in tickets:
        breaker.failed(ticket, batch=one_batch)
    assert breaker.state is CLOSED
    assert breaker.failures == 1
    breaker.failed(breaker.admit(), batch=other_batch)
    assert breaker.failures == 2


def test_a_success_resets_the_count() -> None:
    breaker, _, _ = make(failures=3)
    fail(breaker, 2)
    breaker.succeeded(breaker.admit())
    fail(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.failures == 2


def test_other_endings_decide_nothing() -> None:
    breaker, _, _ = make(failures=2)
    fail(breaker)
    breaker.release(breaker.admit())  # e.g. the deadline passed in the queue
    assert breaker.failures == 1
    assert breaker.state is CLOSED


def test_open_refuses_with_unavailable_and_the_cooldown_left() -> None:
    breaker, clock, _ = make(failures=1, cooldown=10.0)
    fail(breaker)
    clock.advance(4.0)
    with pytest.raises(UnavailableError, match="out of rotation after 1 consecutive engine failures") as caught:
        breaker.admit()
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.retry_after == pytest.approx(6.0)


def test_after_the_cooldown_one_trial_then_closed_on_success() -> None:
    breaker, clock, recorder = make(failures=1, cooldown=10.0)
    fail(breaker)
    clock.advance(10.0)
    assert breaker.state is HALF_OPEN
    trial = breaker.admit()
    with pytest.raises(UnavailableError, match="trial") as caught:
        breaker.admit()  # only one request at a time while half-open
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 10.0
    breaker.succeeded(trial)
    assert breaker.state is CLOSED
    assert recorder.changes == [OPEN, HALF_OPEN, CLOSED]
    breaker.succeeded(breaker.admit())  # everyone gets through again


def test_a_failed_trial_reopens_for_another_cooldown() -> None:
    breaker, clock, recorder = make(failures=1, cooldown=5.0)
    fail(breaker)
    clock.advance(5.0)
    breaker.failed(breaker.admit())
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(5.0)
    assert recorder.changes == [OPEN, HALF_OPEN, OPEN]


def test_a_trial_that_ends_without_a_verdict_frees_the_slot() -> None:
    breaker, clock, _ = make(failures=1, cooldown=1.0)
    fail(breaker)
    clock.advance(1.0)
    breaker.release(breaker.admit())  # the trial timed out in the queue: nothing learned about the engine
    assert breaker.state is HALF_OPEN
    breaker.succeeded(breaker.admit())  # the next request is the trial
    assert breaker.state is CLOSED


def test_outcomes_of_requests_admitted_before_a_change_are_ignored() -> None:
    breaker, clock, _ = make(failures=2, cooldown=1.0)
    slow_success, slow_failure = breaker.admit(), breaker.admit()
    fail(breaker, 2)
    assert breaker.state is OPEN
    breaker.succeeded(slow_success)  # must not close an open breaker
    assert breaker.state is OPEN
    clock.advance(1.0)
    trial = breaker.admit()
    breaker.failed(slow_failure)  # must not re-open: the trial decides
    assert breaker.state is HALF_OPEN
    breaker.succeeded(trial)
    breaker.failed(slow_failure)  # nor count against the closed breaker
    assert breaker.failures == 0


def test_the_timer_turns_it_half_open_without_traffic() -> None:
    breaker, clock, recorder = make(failures=1, cooldown=2.0, timer=True)
    fail(breaker)
    [(delay, wake)] = recorder.timers
    assert delay == 2.0
    clock.advance(1.5)
    wake()  # a timer that fired early re-arms for the time left
    assert recorder.changes == [OPEN]
    (delay, wake) = recorder.timers[-1]
    assert delay == pytest.approx(0.5)
    clock.advance(0.5)
    wake()
    assert recorder.changes == [OPEN, HALF_OPEN]


@pytest.mark.parametrize(("failures", "cooldown"), [(0, 1.0), (1, -1.0)])
def test_nonsensical_settings_are_refused(failures: int, cooldown: float) -> None:
    with pytest.raises(ValueError, match="breaker"):
        CircuitBreaker("m", 1, failures=failures, cooldown=cooldown)


# -- Breakers: one per loaded version ------------------------------------------------------------------------


class _Batcher:
    """Stands in for a version's batcher: the breaker only needs its identity."""


def _version(name: str, number: int, batcher: Any) -> ModelVersion:
    return ModelVersion(name, number, "onnxruntime", state=VersionState.READY, batcher=batcher)


def test_breakers_are_per_version_and_report_the_model_not_serving_while_one_is_open() -> None:
    clock, recorder = FakeClock(), Recorder()
    breakers = Breakers(failures=1, cooldown=1.0, clock=clock, listener=recorder.listener)
    v1, v2 = _version("m", 1, _Batcher()), _version("m", 2, _Batcher())
    entry = ModelEntry("m", versions={1: v1, 2: v2})
    assert breakers.breaker(v1) is breakers.breaker(v1)
    assert breakers.breaker(v1) is not breakers.breaker(v2)
    fail(breakers.breaker(v2))
    assert breakers.states() == {("m", 1): CLOSED, ("m", 2): OPEN}
    assert not breakers.serving(entry)
    clock.advance(1.0)
    assert breakers.serving(entry)  # half-open: health invites the trial


def test_a_reloaded_version_starts_with_a_closed_breaker() -> None:
    clock, recorder = FakeClock(), Recorder()
    breakers = Breakers(failures=1, cooldown=60.0, clock=clock, listener=recorder.listener)
    old = _version("m", 1, _Batcher())
    fail(breakers.breaker(old))
    new = _version("m", 1, _Batcher())  # loaded again: a new engine and batcher
    assert breakers.breaker(new).state is CLOSED
    assert breakers.serving(ModelEntry("m", versions={1: new}))
    assert recorder.changes == [OPEN, CLOSED]  # the gauge and health are told


def test_breakers_refuse_nonsensical_settings_up_front() -> None:
    with pytest.raises(ValueError, match="failures"):
        Breakers(failures=0, cooldown=1.0)
