"""A CPU simulator of the TensorRT and CUDA runtime API surface tensorgate uses, for tests without a GPU.

This simulates the API surface to verify tensorgate's orchestration: the order of copies, executions, event
records and waits on streams, the lifetime of every allocation, stream, event, graph, engine and context, the
checking of every return code, and profile shapes. It verifies nothing about TensorRT or CUDA themselves: no kernel,
no numerics of TensorRT, no real concurrency, no driver behaviour beyond the documented contracts it imitates.
"Execution" runs ONNX Runtime on the ONNX model embedded in a simulated plan.

`GpuSimulator` provides two fake modules, `tensorrt` and `cudart` (`cuda.bindings.runtime`), that `installed()`
puts in `sys.modules`, so code importing the real libraries lazily runs against them unchanged. It is built to make
wrong orchestration fail rather than pass by luck:

- queued work runs lazily, in stream order, only when the host synchronizes and only what that synchronization
  needs, so a missing cudaStreamWaitEvent computes on stale device memory, and a pinned buffer overwritten before
  its copy ran copies the new contents;
- fresh device memory and freed host memory hold 0xFF bytes (NaN as floats), device pointers are never reused;
- misuse (double free, use after free, unknown handles, copies out of bounds, shapes outside the profile,
  executing with a shape or address unset, ...) is recorded in `misuse`, leaks and misuse fail `assert_clean()`;
- `fail_next` makes the next calls of a cudart function or TensorRT method fail as the real one does;
- every operation has a virtual duration (`costs`), and `timeline` shows when each ran in virtual time, so overlap
  of copies and compute is observable without wall-clock timing. An operation starts at the latest of: the end of
  the previous one on its stream, the end of the event records it waits for, and the enqueuing thread's virtual
  clock. Each host thread has its own clock, moved forward by the synchronizations it makes itself (hand-offs
  between threads, such as a future another thread resolves, are invisible to the simulator).

What it does not model: the legacy default stream's implicit synchronization with other streams (handle 0 is an
ordinary per-device stream here), limited copy engines (copies on different streams overlap freely), pageable
host memory in async copies (refused: only cudaHostAlloc memory may be copied), multi-stream graph capture.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

from tests.support.gpu_simulator import runtime, tensorrt
from tests.support.gpu_simulator.core import Costs, DeviceInfo, SimState, TimelineEntry
from tests.support.gpu_simulator.memory import Memory
from tests.support.gpu_simulator.streams import Scheduler
from tests.support.gpu_simulator.trt_types import TrtContext

__all__ = ["TRT_CALLS", "Costs", "GpuSimulator", "TimelineEntry"]

#: The TensorRT methods `fail_next` can make fail (they return False/None as the real ones do on failure).
TRT_CALLS = frozenset(
    {
        "execute_async_v3",
        "set_input_shape",
        "set_tensor_address",
        "create_execution_context",
        "deserialize_cuda_engine",
        "build_serialized_network",
        "parse",
    }
)

_MODULES = ("tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime")


class GpuSimulator:
    """One simulated machine with `devices` identical GPUs, and fake `tensorrt` / `cudart` modules for it."""

    def __init__(
        self,
        *,
        devices: int = 1,
        device_name: str = "tensorgate simulated GPU",
        compute_capability: tuple[int, int] = (8, 9),
        trt_version: str = "10.13.0-sim",
    ) -> None:
        self._state = SimState([DeviceInfo(device_name, compute_capability) for _ in range(devices)], trt_version)
        self._memory = Memory()
        self._scheduler = Scheduler(self._state)
        self._runtime = runtime.CudaRuntime(self._state, self._memory, self._scheduler)
        self.cudart: types.ModuleType = runtime.build_module(self._runtime)
        self.tensorrt: types.ModuleType = tensorrt.build_module(
            TrtContext(self._state, self._memory, self._scheduler, self._runtime)
        )

    # Settings and records

    @property
    def trt_version(self) -> str:
        """The simulated TensorRT version; plans built under another one deserialize to None."""
        return self._state.trt_version

    @trt_version.setter
    def trt_version(self, version: str) -> None:
        with self._state.lock:
            self._state.trt_version = version
            setattr(self.tensorrt, "__version__", version)  # noqa: B010 (a module attribute mypy cannot see)

    @property
    def costs(self) -> Costs:
        """The virtual cost of each kind of operation (settable fields)."""
        return self._state.costs

    @property
    def misuse(self) -> list[str]:
        """Every misuse seen so far (a test that provokes one on purpose may clear it)."""
        return self._state.misuse

    @property
    def timeline(self) -> list[TimelineEntry]:
        """Every operation that ran, in the order it ran, with virtual start and end times."""
        return self._state.timeline

    @property
    def errors(self) -> list[str]:
        """Every message the fake TensorRT logged at ERROR (also sent to the caller's logger)."""
        return self._state.errors

    # Installation

    @contextlib.contextmanager
    def installed(self) -> Iterator[GpuSimulator]:
        """Put the fakes in sys.modules as 'tensorrt', 'cuda', 'cuda.bindings', 'cuda.bindings.runtime' (and as
        attribute `runtime` of the fake cuda.bindings), restoring what was there on exit."""
        cuda = types.ModuleType("cuda", "Simulated cuda-python package (tests only).")
        cuda.__path__ = []
        bindings = types.ModuleType("cuda.bindings", "Simulated cuda.bindings (tests only).")
        bindings.__path__ = []
        bindings.runtime = self.cudart  # type: ignore[attr-defined]
        cuda.bindings = bindings  # type: ignore[attr-defined]
        fakes = dict(zip(_MODULES, (self.tensorrt, cuda, bindings, self.cudart), strict=True))
        saved = {name: sys.modules.get(name) for name in _MODULES}
        sys.modules.update(fakes)
        try:
            yield self
        finally:
            for name, previous in saved.items():
                if previous is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = previous

    # Error injection

    def fail_next(self, call: str, *, times: int = 1, error: str = "cudaErrorMemoryAllocation") -> None:
        """The next `times` calls of `call` fail: a cudart function name ("cudaMalloc", "cudaMemcpyAsync", ...)
        returns that cudaError_t; a TensorRT method name ("execute_async_v3", "set_input_shape",
        "set_tensor_address", "create_execution_context", "deserialize_cuda_engine", "build_serialized_network",
        "parse") returns False/None as the real one does on failure."""
        if call in runtime.FUNCTIONS:
            if error not in runtime.cudaError_t.__members__:
                raise ValueError(f"{error!r} is not a cudaError_t name")
        elif call not in TRT_CALLS:
            raise ValueError(f"cannot inject failures into {call!r}: not a simulated cudart or TensorRT call")
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        self._state.inject(call, times, error)

    # Accounting

    def live(self) -> dict[str, int]:
        """Live objects by kind: device, host, stream, event, graph, graph_exec, engine, context (engines and
        contexts count until they are garbage or explicitly deleted)."""
        objects = self._state.object_counts()
        with self._state.lock:
            counts = {"device": len(self._memory.live_device()), "host": len(self._memory.live_host())}
            counts.update(self._scheduler.live())
        counts["engine"] = objects.get("engine", 0)
        counts["context"] = objects.get("context", 0)
        return counts

    def assert_clean(self) -> None:
        """Fail (AssertionError) listing leaked device/host memory, streams, events, graphs, and every misuse."""
        problems: list[str] = []
        with self._state.lock:
            problems += [
                f"leak: {a.size}-byte device allocation {a.base:#x} on device {a.device} never freed (cudaFree)"
                for a in self._memory.live_device()
            ]
            problems += [
                f"leak: {a.size}-byte host allocation {a.base:#x} never freed (cudaFreeHost)"
                for a in self._memory.live_host()
            ]
            for kind, count in self._scheduler.live().items():
                if count:
                    problems.append(f"leak: {count} {kind}(s) never destroyed")
            problems += [f"misuse: {message}" for message in self._state.misuse]
        if problems:
            raise AssertionError("GPU simulator found problems:\n  " + "\n  ".join(problems))
