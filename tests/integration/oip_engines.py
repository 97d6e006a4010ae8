"""A test-only engine for the Open Inference Protocol tests: batches wait at a gate the test opens.

It runs inside the test process's server thread (tests/support/serving.py), registered under the platform
"gate_test", so tests can hold a batch in the engine and fill the queue behind it deterministically.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tensorgate.engines import EngineSettings, TensorSpec, register_engine

__all__ = ["GATE_CONFIG", "GateEngine", "add_gate_model"]


class GateEngine:
    """y = x over FP32 [-1, 1]; every batch waits until the test opens `gate`, and is recorded."""

    gate: ClassVar[threading.Event] = threading.Event()
    entered: ClassVar[threading.Event] = threading.Event()
    batches: ClassVar[list[list[float]]] = []

    def __init__(self, settings: EngineSettings) -> None:
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (-1, 1)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (-1, 1)),)
        self.instance_count = 1
        self.description = "gate (test engine)"

    async def load(self) -> None:
        return None

    async def warmup(self) -> None:
        return None

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[Any]], *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        GateEngine.entered.set()
        await asyncio.to_thread(GateEngine.gate.wait, 60)
        x = np.array(inputs["x"], np.float32)
        GateEngine.batches.append(x.ravel().tolist())
        return {"y": x}

    async def close(self) -> None:
        return None


register_engine("gate_test", backend="gate_test", target=f"{__name__}:GateEngine", default_filename="model.gate")

GATE_CONFIG = """
name: "gate"
platform: "gate_test"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
dynamic_batching { priority_levels: 2, default_priority_level: 2, default_queue_policy { max_queue_size: 2 } }
"""


def add_gate_model(repository: Path, name: str = "gate") -> Path:
    """Put the gate model into `repository` and reset the gate (closed) and its records."""
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(GATE_CONFIG.replace('name: "gate"', f'name: "{name}"'))
    GateEngine.gate.clear()
    GateEngine.entered.clear()
    GateEngine.batches.clear()
    return repository / name
