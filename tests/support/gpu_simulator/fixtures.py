"""The `gpu_simulator` pytest fixture (registered for every test through `pytest_plugins` in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.gpu_simulator import GpuSimulator

__all__ = ["gpu_simulator"]


@pytest.fixture
def gpu_simulator() -> Iterator[GpuSimulator]:
    """A GpuSimulator with one device, installed as `tensorrt` and `cuda.bindings.runtime`; at teardown it must be
    clean: no leaked memory, streams, events or graphs, and no misuse."""
    simulator = GpuSimulator()
    with simulator.installed():
        yield simulator
    simulator.assert_clean()
