"""Test-only engines that misbehave on purpose: they raise, hang, or return outputs of the wrong shape.

They run inside the test process's server thread (tests/support/serving.py), registered under the platform
"chaos_test". A model picks its fault with the config parameter `fault` (see `FAULTS`); the fault strikes only
batches holding a *poison* row (any negative value in `x`), so one model serves good and bad batches side by
side and a test can show that a fault fails only its own batch.

The healthy computation: x FP32 [batch, 2] -> y = 2x FP32 [batch, 2], s = row sums FP32 [batch, 1].

A hung batch waits (on a worker thread, as a stuck native call would) until the test sets `ChaosEngine.release`
(bounded by `HANG_LIMIT` seconds, so a broken test cannot hang the process forever); `ChaosEngine.hung` is set
as soon as one batch hangs, so tests wait on it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tensorgate.engines import EngineError, EngineSettings, TensorSpec, register_engine

__all__ = [
    "CHAOS_PLATFORM",
    "FAULTS",
    "HANG_LIMIT",
    "ChaosEngine",
    "add_chaos_model",
    "good_rows",
    "poison_rows",
    "reset_chaos",
]

CHAOS_PLATFORM = "chaos_test"
#: Seconds a hung batch waits for `ChaosEngine.release` at most (then it fails, so nothing hangs for good).
HANG_LIMIT = 60.0

#: Each fault and what a poisoned batch does.
FAULTS: dict[str, str] = {
    "none": "computes correctly",
    "raise": "raises RuntimeError",
    "engine_error": "raises EngineError (what a real engine raises)",
    "hang": "waits for ChaosEngine.release (a stuck native call)",
    "rows": "returns y with one row fewer than the batch",
    "dtype": "returns y as FP64 instead of FP32",
    "dims": "returns y with 3 columns instead of 2",
    "missing": "leaves out the output s",
    "extra": "adds an output the model does not declare",
    "not_array": "returns y as a Python list",
    "not_mapping": "returns None instead of a mapping of outputs",
}


class ChaosEngine:
    """Computes y = 2x and s = row sums; a batch with a negative value in x gets the model's `fault`."""

    #: Set by the test to let hung batches go on.
    release: ClassVar[threading.Event] = threading.Event()
    #: Set when a batch starts hanging.
    hung: ClassVar[threading.Event] = threading.Event()
    #: (model directory, instance, rows) of every batch that ran to the end, faulty or not.
    batches: ClassVar[list[tuple[str, int, int]]] = []

    def __init__(self, settings: EngineSettings) -> None:
        self.fault = settings.parameters.get("fault", "none")
        if self.fault not in FAULTS:
            raise EngineError(f"unknown chaos fault {self.fault!r} (known: {', '.join(FAULTS)})")
        self.model = settings.model_file.parent.parent.name
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (-1, 2)),)
        self.outputs = (
            TensorSpec("y", np.dtype(np.float32), (-1, 2)),
            TensorSpec("s", np.dtype(np.float32), (-1, 1)),
        )
        self.instance_count = settings.instance_count
        self.description = f"chaos (test engine, fault {self.fault})"

    async def load(self) -> None:
        return None

    async def warmup(self) -> None:
        return None

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[Any]], *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> Any:  # Any: the faults return what an engine must not
        x = np.asarray(inputs["x"], np.float32)
        poisoned = bool((x < 0).any())
        try:
            if not poisoned:
                return _compute(x)
            return await self._misbehave(x)
        finally:
            ChaosEngine.batches.append((self.model, instance, len(x)))

    async def _misbehave(self, x: npt.NDArray[np.float32]) -> Any:
        good = _compute(x)
        fault = self.fault
        if fault == "raise":
            raise RuntimeError("chaos: the engine blew up")
        if fault == "engine_error":
            raise EngineError("chaos: the device fell over")
        if fault == "hang":
            ChaosEngine.hung.set()
            # On a daemon thread of its own, as real engines run (InstanceThread): a thread of asyncio's default
            # executor would make the event loop's shutdown wait for it.
            if not await _on_daemon_thread(ChaosEngine.release.wait, HANG_LIMIT):
                raise EngineError(f"chaos: nobody released the hung batch within {HANG_LIMIT}s")
            return good
        if fault == "rows":
            return {**good, "y": good["y"][:-1]}
        if fault == "dtype":
            return {**good, "y": good["y"].astype(np.float64)}
        if fault == "dims":
            return {**good, "y": np.concatenate([good["y"], good["s"]], axis=1)}
        if fault == "missing":
            return {"y": good["y"]}
        if fault == "extra":
            return {**good, "debug": good["s"]}
        if fault == "not_array":
            return {**good, "y": good["y"].tolist()}
        if fault == "not_mapping":
            return None
        return good

    async def close(self) -> None:
        return None


def _compute(x: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    return {"y": x * 2, "s": x.sum(axis=1, keepdims=True)}


register_engine(
    CHAOS_PLATFORM, backend=CHAOS_PLATFORM, target=f"{__name__}:ChaosEngine", default_filename="model.chaos"
)

_CONFIG = """
name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch_size}
dynamic_batching {{ default_queue_policy {{ max_queue_size: {queue} }} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
parameters {{ key: "fault" value {{ string_value: "{fault}" }} }}
"""


def add_chaos_model(
    repository: Path, name: str, fault: str, *, instances: int = 1, max_batch_size: int = 8, queue: int = 64
) -> Path:
    """Put a chaos model called `name` with `fault` (one of FAULTS) into `repository`; return its directory."""
    if fault not in FAULTS:
        raise ValueError(f"unknown chaos fault {fault!r} (known: {', '.join(FAULTS)})")
    directory = repository / name
    (directory / "1").mkdir(parents=True)
    (directory / "config.pbtxt").write_text(
        _CONFIG.format(
            name=name,
            platform=CHAOS_PLATFORM,
            max_batch_size=max_batch_size,
            queue=queue,
            instances=instances,
            fault=fault,
        )
    )
    return directory


def _on_daemon_thread(call: Callable[..., bool], *args: Any) -> asyncio.Future[bool]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()

    def run() -> None:
        result = call(*args)
        with contextlib.suppress(RuntimeError):  # the loop may be closed by then
            loop.call_soon_threadsafe(lambda: None if future.done() else future.set_result(result))

    threading.Thread(target=run, name="chaos-hang", daemon=True).start()
    return future


def reset_chaos() -> None:
    """Close the hang gate, clear `hung` and the batch records (call before each test that uses them)."""
    ChaosEngine.release.clear()
    ChaosEngine.hung.clear()
    ChaosEngine.batches.clear()


def good_rows(rows: int = 1, start: float = 0.0) -> npt.NDArray[np.float32]:
    """`rows` healthy rows of x (non-negative)."""
    return (np.arange(rows * 2, dtype=np.float32).reshape(rows, 2) + start).astype(np.float32)


def poison_rows(rows: int = 1) -> npt.NDArray[np.float32]:
    """`rows` rows of x that trigger the model's fault."""
    return -good_rows(rows, 1.0)
