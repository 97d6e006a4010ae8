"""Watching the repository for file changes (`--watch-repository`), with the `watchfiles` package (inotify on Linux).

The watcher only says *that* something changed; the rescan decides what (`rescan.plan_rescan`) and waits for the
files to settle, so bursts of events (a copy of many files) cost one or two rescans. Hidden and temporary names
are filtered out here too, so a publisher writing `.staging/` or `model.onnx.tmp` wakes nobody until it renames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from tensorgate.server.repository.rescan import ignored_name

__all__ = ["watch_repository"]

log = logging.getLogger(__name__)

#: Milliseconds of quiet watchfiles waits for before reporting a burst of changes.
_DEBOUNCE_MS = 300


def _relevant(root: Path) -> Callable[[object, str], bool]:
    def relevant(change: object, path: str) -> bool:
        try:
            parts = Path(path).relative_to(root).parts
        except ValueError:
            return False
        return bool(parts) and not any(ignored_name(part) for part in parts)

    return relevant


async def watch_repository(
    root: Path, on_change: Callable[[], None], stop: asyncio.Event, started: asyncio.Event | None = None
) -> None:
    """Call `on_change()` after each burst of relevant changes under `root`, until `stop` is set.

    `started` is set once the file watch is in place; `on_change()` is also called then, so that a change made
    before the watch existed (while the server was starting) is not missed.
    """
    import watchfiles  # imported only when watching: the rest of the server does without it

    root = await asyncio.to_thread(root.resolve)
    changes = watchfiles.awatch(
        root, watch_filter=_relevant(root), stop_event=stop, debounce=_DEBOUNCE_MS, recursive=True
    )
    # watchfiles builds its watcher (and so registers the inotify watches) synchronously when the generator is
    # first advanced, before its first suspension; one turn of the loop later the watch is in place.
    first = asyncio.ensure_future(anext(changes, None))
    try:
        await asyncio.sleep(0)
        if first.done():
            first.result()  # the watch could not be set up (e.g. the root vanished): raise it
        log.info("watching %s for changes", root)
        if started is not None:
            started.set()
        on_change()
        batch = await first
        while batch is not None:
            log.debug("repository changes: %s", sorted(path for _, path in batch))
            on_change()
            batch = await anext(changes, None)
    finally:
        if not first.done():
            first.cancel()
        await changes.aclose()
