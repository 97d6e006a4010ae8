"""A dedicated thread per engine instance, handing results back to asyncio.

Each engine instance owns one thread that runs its blocking calls (an ONNX Runtime `run`, a wait on a CUDA
stream) in order. Results reach the event loop through `loop.call_soon_threadsafe`, so the loop never blocks,
and there is no executor queue or concurrent.futures chaining in between: a hop costs one queue put and one
loop wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["InstanceThread", "reject", "resolve", "settle"]

T = TypeVar("T")


def resolve(future: asyncio.Future[Any], result: Any) -> None:
    """Give `future` its result, unless its awaiting caller was cancelled meanwhile (call on its loop)."""
    if not future.done():
        future.set_result(result)


def reject(future: asyncio.Future[Any], error: BaseException) -> None:
    """Give `future` its exception, unless its awaiting caller was cancelled meanwhile (call on its loop)."""
    if not future.done():
        future.set_exception(error)


def settle(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Run `callback(*args)` (resolve or reject) on `loop` from another thread; nothing when the loop is closed,
    since nobody is waiting any more, and the thread must live on to serve the next work."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


class InstanceThread:
    """One daemon thread that runs submitted callables one at a time, in submission order."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def name(self) -> str:
        """The thread's name (it shows in stack dumps and profilers)."""
        return self._thread.name

    def run(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `call` on this thread; await the returned future for its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting caller, whatever it is
                settle(loop, reject, future, exc)
            else:
                settle(loop, resolve, future, result)

        self.submit(job)
        return future

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`, which settles whatever futures it has itself (from any thread)."""
        if self._closed:
            raise RuntimeError(f"thread {self.name} is closed")
        self._work.put(job)

    def _serve(self) -> None:
        while (job := self._work.get()) is not None:
            job()

    def close(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """Stop after the work already queued; with `wait`, join the thread (at most `timeout` seconds)."""
        if not self._closed:
            self._closed = True
            self._work.put(None)
        if wait:
            self._thread.join(timeout)
