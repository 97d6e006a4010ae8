"""Fixtures for integration tests: a real server on a real port serving the bundled models."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support.chaos_engines import ChaosEngine, reset_chaos
from tests.support.serving import EXAMPLE_MODELS, ServerThread, running_server


@pytest.fixture(scope="session")
def served() -> Iterator[ServerThread]:
    """One server for the session over examples/models (digits, add_sub). `.address` is HOST:PORT."""
    with running_server(EXAMPLE_MODELS) as server:
        yield server


@pytest.fixture
def channel(served: ServerThread) -> Iterator[grpc.Channel]:
    """A plain sync channel to the session's server."""
    with grpc.insecure_channel(served.address) as chan:
        yield chan


@pytest.fixture
def chaos() -> Iterator[type[ChaosEngine]]:
    """The chaos engines' shared state (tests/support/chaos_engines.py), reset; hung batches are released when the
    test ends."""
    reset_chaos()
    try:
        yield ChaosEngine
    finally:
        ChaosEngine.release.set()
