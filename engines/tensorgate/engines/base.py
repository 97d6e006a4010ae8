"""The engine protocol: what the server needs from anything that runs batches of tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Engine", "EngineError", "EngineInputError", "EngineSettings", "EngineUnavailableError", "TensorSpec"]


class EngineError(Exception):
    """An engine could not load, or could not run a batch. The message says which and why."""


class EngineUnavailableError(EngineError):
    """The engine cannot run here at all (its library is not installed, or there is no GPU): a reason to fall back,
    not a broken model."""


class EngineInputError(EngineError):
    """A batch the engine cannot take (e.g. a shape outside the plan's optimization profile), refused before any
    work was queued: the caller's fault, not the engine's."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor an engine takes or produces.

    `shape` is the full shape the engine sees, batch dimension included; -1 marks a variable dimension.
    `dtype` is a numpy dtype: `object` stands for BYTES, `ml_dtypes.bfloat16` for BF16.
    `min_shape`/`max_shape`, when the engine has them (a TensorRT optimization profile), bound every dimension,
    batch dimension included; requests outside them are refused before they are queued.
    """

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How to build an engine for one model version."""

    model_file: Path
    instance_count: int = 1
    # Threads each instance may use for one operator; 0 lets the engine choose.
    intra_op_threads: int = 0
    # Free-form settings from the model config's `parameters`.
    parameters: Mapping[str, str] = field(default_factory=dict)
    # The GPU of each instance (instance_group `gpus`), one entry per instance; empty means GPU 0 for all.
    # Engines that do not use a GPU ignore it.
    devices: tuple[int, ...] = ()
    # Where built TensorRT plans are cached; None means the engine's default (see tensorgate.engines.plans).
    plan_cache_dir: Path | None = None
    # The most rows the batcher will send in one batch (the config's max_batch_size; 0: the model does not
    # batch). Engines that fix their shapes ahead (a TensorRT plan built at load) size for it.
    max_batch_size: int = 0


Arrays = Mapping[str, npt.NDArray[np.generic]]


@runtime_checkable
class Engine(Protocol):
    """Runs whole batches. One engine serves one model version with `instance_count` parallel instances.

    The batcher calls `infer` with an instance index in `range(instance_count)` and never runs two batches on the
    same instance at once, so an instance may keep per-instance state (a session, a stream, buffers) unlocked.
    """

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        """The tensors the engine takes."""
        ...

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        """The tensors the engine produces."""
        ...

    @property
    def instance_count(self) -> int:
        """How many batches may run at once."""
        ...

    @property
    def description(self) -> str:
        """What is actually running, e.g. "onnxruntime 1.31.1 (CPUExecutionProvider)"."""
        ...

    async def load(self) -> None:
        """Load the model and create every instance. Raises EngineError naming the file and the problem."""
        ...

    async def warmup(self) -> None:
        """Run each instance once so the first real request pays no first-run costs."""
        ...

    async def infer(
        self, inputs: Arrays, *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run one batch on one instance without blocking the event loop; `outputs=None` means all."""
        ...

    async def close(self) -> None:
        """Free every instance and what it holds. Safe to call twice."""
        ...
