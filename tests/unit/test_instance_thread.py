"""InstanceThread: calls run off the event loop, in order, with results and errors handed back."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from tensorgate.engines.threads import InstanceThread


async def test_runs_in_order_on_its_own_thread() -> None:
    thread = InstanceThread("test-instance")
    seen: list[tuple[int, str]] = []

    def work(index: int) -> int:
        seen.append((index, threading.current_thread().name))
        return index * 10

    try:
        results = await asyncio.gather(*(thread.run(functools.partial(work, i)) for i in range(20)))
    finally:
        thread.close(wait=True, timeout=5)
    assert results == [i * 10 for i in range(20)]
    assert seen == [(i, "test-instance") for i in range(20)]


async def test_errors_reach_the_caller_and_the_thread_goes_on() -> None:
    thread = InstanceThread("test-errors")

    def fail() -> None:
        raise ValueError("boom")

    try:
        with pytest.raises(ValueError, match="boom"):
            await thread.run(fail)
        assert await thread.run(lambda: 7) == 7
    finally:
        thread.close(wait=True, timeout=5)


async def test_closed_thread_refuses_work() -> None:
    thread = InstanceThread("test-closed")
    thread.close(wait=True, timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        thread.run(lambda: None)


async def test_a_cancelled_caller_does_not_break_the_thread() -> None:
    thread = InstanceThread("test-cancel")
    gate = threading.Event()
    try:
        pending = thread.run(gate.wait)
        pending.cancel()
        gate.set()
        assert await thread.run(lambda: "after") == "after"
    finally:
        thread.close(wait=True, timeout=5)


def test_a_closed_event_loop_does_not_kill_the_thread() -> None:
    # A caller's loop may be gone when its work finishes (a test's loop, a stopped server): the thread must
    # live on for the next caller instead of dying of call_soon_threadsafe's RuntimeError.
    thread = InstanceThread("survivor")
    gate = threading.Event()

    async def leave_work_behind() -> None:
        thread.run(gate.wait)  # not awaited: the loop closes with the work still running

    asyncio.run(leave_work_behind())
    gate.set()

    async def next_caller() -> int:
        return await thread.run(lambda: 42)

    try:
        assert asyncio.run(next_caller()) == 42
    finally:
        thread.close(wait=True, timeout=10)
