"""A dedicated thread per engine instance, handing results back to asyncio.

Each engine instance owns one thread that runs its blocking calls (an ONNX Runtime `run`, a wait on a CUDA
stream) in order. Results reach the event loop through `loop.call_soon_threadsafe`, so the loop never blocks,
and there is no executor queue or concurrent.futures chaining in between: a hop costs one queue put and one
loop wake-up.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["InstanceThread"]

T = TypeVar("T")

_Work = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the awaiting caller may have been cancelled meanwhile
        future.set_result(result)


def _reject(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class InstanceThread:
    """One daemon thread that runs submitted callables one at a time, in submission order."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def name(self) -> str:
        """The thread's name (it shows in stack dumps and profilers)."""
        return self._thread.name

    def run(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `call` on this thread; await the returned future for its result or exception."""
        if self._closed:
            raise RuntimeError(f"thread {self.name} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._work.put((call, future, loop))
        return future

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            call, future, loop = work
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting caller, whatever it is
                loop.call_soon_threadsafe(_reject, future, exc)
            else:
                loop.call_soon_threadsafe(_resolve, future, result)

    def close(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """Stop after the work already queued; with `wait`, join the thread (at most `timeout` seconds)."""
        if not self._closed:
            self._closed = True
            self._work.put(None)
        if wait:
            self._thread.join(timeout)
