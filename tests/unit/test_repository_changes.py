"""Repository changes run to their end: a load whose caller is cancelled (a client's deadline during a slow
TensorRT build) still finishes and installs, or frees what it made; nothing is left open and unowned."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tensorgate.engines import EngineSettings, TensorSpec, register_engine
from tensorgate.server.repository import Repository

CONFIG = """
platform: "slow_load_test"
version_policy { all { } }
max_batch_size: 4
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
"""


class SlowLoadEngine:
    """y = x; version 2's `load` waits for `release`. Counts engines opened and closed."""

    release: ClassVar[asyncio.Event | None] = None
    started: ClassVar[asyncio.Event | None] = None
    opened: ClassVar[int] = 0
    closed: ClassVar[int] = 0

    def __init__(self, settings: EngineSettings) -> None:
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (-1, 1)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (-1, 1)),)
        self.instance_count = 1
        self.description = "slow load (test engine)"
        self._open = False
        self._slow = settings.model_file.parent.name == "2"

    async def load(self) -> None:
        assert SlowLoadEngine.release is not None
        assert SlowLoadEngine.started is not None
        SlowLoadEngine.opened += 1
        self._open = True
        if self._slow:
            SlowLoadEngine.started.set()
            await SlowLoadEngine.release.wait()

    async def warmup(self) -> None:
        return None

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[Any]], *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        return {"y": np.array(inputs["x"], np.float32)}

    async def close(self) -> None:
        if self._open:
            self._open = False
            SlowLoadEngine.closed += 1


register_engine("slow_load_test", backend="slow_load_test", target=f"{__name__}:SlowLoadEngine", default_filename="m")


async def test_a_cancelled_reload_still_finishes_and_nothing_is_left_open(tmp_path: Path) -> None:
    SlowLoadEngine.release, SlowLoadEngine.started = asyncio.Event(), asyncio.Event()
    SlowLoadEngine.opened = SlowLoadEngine.closed = 0
    for version in ("1", "2"):
        (tmp_path / "slow" / version).mkdir(parents=True)
    (tmp_path / "slow" / "config.pbtxt").write_text(CONFIG)
    repository = Repository(tmp_path)
    SlowLoadEngine.release.set()
    await repository.load()
    assert repository.model("slow").ready
    SlowLoadEngine.release.clear()
    SlowLoadEngine.started.clear()

    caller = asyncio.create_task(repository.load_model("slow"))  # a reload, as RepositoryModelLoad makes it
    await SlowLoadEngine.started.wait()
    caller.cancel()  # the client's deadline passed while version 2 was loading (version 1 had loaded)
    await asyncio.gather(caller, return_exceptions=True)
    assert caller.cancelled()
    SlowLoadEngine.release.set()

    await repository.close()  # waits for the change under way, then frees everything
    assert SlowLoadEngine.opened == 4  # two versions, loaded twice
    assert SlowLoadEngine.closed == 4, "an engine was left open"
