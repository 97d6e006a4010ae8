"""Drop policies: what a stream does with frames that arrive faster than the model serves them.

A camera sends at its own rate whatever the server can do. Queued on the way (HTTP/2 flow control buffers
megabytes), its frames would be answered seconds late; so a stream's reader takes every frame off the wire as it
arrives and puts it in a `FrameBuffer`, which holds at most a few and drops (and counts) the rest per policy.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Generic, TypeVar

__all__ = ["DropPolicy", "FrameBuffer"]

T = TypeVar("T")


class DropPolicy(enum.Enum):
    """How a full `FrameBuffer` makes room."""

    #: Hold one frame; a newer one replaces it. Every result is of the freshest frame the model could take.
    LATEST = "latest"
    #: Hold up to `capacity` frames; a newer one drops the oldest.
    QUEUE = "queue"
    #: Hold up to `capacity` frames; `put` waits for room, so the sender is slowed by flow control instead.
    BLOCK = "block"


class FrameBuffer(Generic[T]):
    """The frames of one stream waiting to be taken, bounded by its drop policy.

    One task puts, another gets; `close()` says no more frames will come, after which `get` drains what is
    left and then returns None. `dropped` counts frames dropped since creation; `peak` is the most frames ever
    held at once (never above `capacity`).
    """

    def __init__(self, policy: DropPolicy, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.policy = policy
        self.capacity = 1 if policy is DropPolicy.LATEST else capacity
        self.dropped = 0
        self.peak = 0
        self._items: deque[T] = deque()
        self._closed = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        """Hold `item`, dropping the oldest held frame (LATEST, QUEUE) or waiting for room (BLOCK) when full."""
        if self._closed:
            raise RuntimeError("put on a closed FrameBuffer")
        while len(self._items) >= self.capacity:
            if self.policy is DropPolicy.BLOCK:
                self._writable.clear()
                await self._writable.wait()
                continue
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self.peak = max(self.peak, len(self._items))
        self._readable.set()

    async def get(self) -> T | None:
        """The oldest held frame, waiting for one; None once the buffer is closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def close(self) -> None:
        """No more frames will be put; `get` returns what is held, then None."""
        self._closed = True
        self._readable.set()
