"""Markers by folder: tests/unit -> unit, tests/integration -> integration, tests/gpu -> gpu, tests/soak -> soak."""

from __future__ import annotations

from pathlib import Path

import pytest

_TESTS = Path(__file__).parent

# The `gpu_simulator` fixture: the CPU simulator of TensorRT and cudart (tests/support/gpu_simulator).
pytest_plugins = ["tests.support.gpu_simulator.fixtures"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(item.path).relative_to(_TESTS).parts[0]
        if folder in ("unit", "integration", "gpu", "soak"):
            item.add_marker(getattr(pytest.mark, folder))
