"""Drop policies: what a stream's FrameBuffer keeps, drops and counts, and when it makes the reader wait."""

from __future__ import annotations

import asyncio

import pytest

from tensorgate.server.streams import DropPolicy, FrameBuffer


async def _drain(buffer: FrameBuffer[int]) -> list[int]:
    buffer.close()
    items = []
    while (item := await buffer.get()) is not None:
        items.append(item)
    return items


async def test_latest_keeps_only_the_newest_frame_and_counts_the_rest() -> None:
    buffer: FrameBuffer[int] = FrameBuffer(DropPolicy.LATEST, capacity=8)  # capacity is 1 under LATEST
    for frame in range(10):
        await buffer.put(frame)

    assert buffer.capacity == 1
    assert buffer.dropped == 9
    assert buffer.peak == 1
    assert await _drain(buffer) == [9]


async def test_queue_drops_the_oldest_when_full() -> None:
    buffer: FrameBuffer[int] = FrameBuffer(DropPolicy.QUEUE, capacity=3)
    for frame in range(7):
        await buffer.put(frame)

    assert buffer.dropped == 4
    assert buffer.peak == 3
    assert await _drain(buffer) == [4, 5, 6]


async def test_nothing_is_dropped_while_the_taker_keeps_up() -> None:
    buffer: FrameBuffer[int] = FrameBuffer(DropPolicy.LATEST)
    taken = []
    for frame in range(5):
        await buffer.put(frame)
        taken.append(await buffer.get())

    assert taken == [0, 1, 2, 3, 4]
    assert buffer.dropped == 0


async def test_block_makes_the_putter_wait_for_room_and_drops_nothing() -> None:
    buffer: FrameBuffer[int] = FrameBuffer(DropPolicy.BLOCK, capacity=2)
    await buffer.put(0)
    await buffer.put(1)
    third = asyncio.create_task(buffer.put(2))
    await asyncio.sleep(0)
    await asyncio.sleep(0)

    assert not third.done()  # full: the reader waits, so flow control pushes back on the sender
    assert await buffer.get() == 0
    await asyncio.wait_for(third, timeout=5)
    assert buffer.dropped == 0
    assert buffer.peak == 2
    assert await _drain(buffer) == [1, 2]


async def test_get_waits_for_a_frame_and_returns_none_once_closed_and_empty() -> None:
    buffer: FrameBuffer[int] = FrameBuffer(DropPolicy.QUEUE, capacity=2)
    waiting = asyncio.create_task(buffer.get())
    await asyncio.sleep(0)
    assert not waiting.done()

    await buffer.put(7)
    assert await asyncio.wait_for(waiting, timeout=5) == 7

    await buffer.put(8)
    buffer.close()
    assert await buffer.get() == 8  # what was held is still taken after close
    assert await buffer.get() is None
    with pytest.raises(RuntimeError):
        await buffer.put(9)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FrameBuffer(DropPolicy.QUEUE, capacity=0)
