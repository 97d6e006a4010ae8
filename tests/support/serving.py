"""A real tensorgate server on a real port, run on its own event loop thread for tests.

Tests talk to it through real gRPC channels (sync or asyncio) exactly as clients in another process would;
running it in a thread keeps startup cheap and lets a test register test-only engines in the same process.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from tensorgate.server.app import Server
from tensorgate.server.settings import ServerSettings

__all__ = ["EXAMPLE_MODELS", "ServerThread", "copy_models", "running_server"]

EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "examples" / "models"


class ServerThread:
    """Runs `Server(settings)` on a private event loop in a daemon thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = replace(settings, address=settings.address or "127.0.0.1:0")
        self.server = Server(self.settings)
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self.address = await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stopped.wait()
        await self.server.stop(grace=2.0)

    def start(self) -> str:
        """Start and wait until every model is loaded and the port is bound; return HOST:PORT."""
        self._thread.start()
        self._started.wait(timeout=60)
        if self._error is not None:
            raise self._error
        return self.address

    def call(self, coroutine: Any) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect or poke the server) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def stop(self) -> None:
        """Drain and stop, and wait for the thread."""
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=30)


@contextmanager
def running_server(repository: Path, **settings: Any) -> Iterator[ServerThread]:
    """A started ServerThread over `repository` with `settings` overrides, stopped on exit."""
    thread = ServerThread(ServerSettings(address="127.0.0.1:0", repository=repository, **settings))
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def copy_models(destination: Path, *names: str) -> Path:
    """Copy bundled example models (all when no names are given) into a fresh repository folder."""
    destination.mkdir(parents=True, exist_ok=True)
    for source in sorted(EXAMPLE_MODELS.iterdir()):
        if source.is_dir() and (not names or source.name in names):
            shutil.copytree(source, destination / source.name)
    return destination
