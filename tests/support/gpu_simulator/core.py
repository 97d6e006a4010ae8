"""Shared state of one simulated machine: the lock, devices, misuse log, injected failures, virtual clocks.

Every fake module (cudart, tensorrt) of one `GpuSimulator` holds the same `SimState`, and every public call takes
`SimState.lock` for its whole duration, so calls from several threads see one consistent machine.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["Costs", "DeviceInfo", "Fault", "SimState", "TimelineEntry"]

_log = logging.getLogger("tests.gpu_simulator")


class TimelineEntry(NamedTuple):
    """One operation that ran on a simulated stream, in virtual microseconds."""

    device: int
    stream: int
    kind: str  # "h2d" | "d2h" | "d2d" | "h2h" | "execute"
    start: float
    end: float
    label: str


@dataclass(slots=True)
class Costs:
    """What each queued operation costs in virtual microseconds (settable per simulator)."""

    copy_latency_us: float = 2.0
    copy_bytes_per_us: float = 12_000.0  # about 12 GB/s, a PCIe 4 x16 link
    execute_us: float = 100.0
    graph_node_us: float = 0.0  # extra per node replayed from a graph (launch overhead is what graphs save)

    def copy(self, nbytes: int) -> float:
        """The virtual duration of a copy of `nbytes`."""
        return self.copy_latency_us + nbytes / self.copy_bytes_per_us


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The identity a simulated GPU reports (cudaGetDeviceProperties, plan compatibility)."""

    name: str
    compute_capability: tuple[int, int]
    total_memory: int = 16 << 30


class Fault(Exception):  # noqa: N818 (a simulated GPU fault, named as CUDA does)
    """A misuse found while running queued work; recorded, and reported by the next synchronization."""


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.device = 0  # CUDA's current device is per host thread
        self.host_time = 0.0  # each host thread has its own virtual clock


@dataclass(eq=False)
class SimState:
    """Everything one simulated machine shares across its fake modules."""

    devices: list[DeviceInfo]
    trt_version: str
    costs: Costs = field(default_factory=Costs)
    lock: threading.RLock = field(default_factory=threading.RLock)
    misuse: list[str] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    # Messages the fake TensorRT logged at ERROR or worse (also sent to the caller's logger).
    errors: list[str] = field(default_factory=list)
    _failures: dict[str, list[str]] = field(default_factory=dict)
    _objects: Counter[str] = field(default_factory=Counter)
    _thread: _ThreadState = field(default_factory=_ThreadState)

    # Misuse and injected failures

    def record_misuse(self, message: str) -> None:
        """Note a misuse; tests see it in `misuse` and `assert_clean` fails on it."""
        with self.lock:
            self.misuse.append(message)
        _log.warning("gpu simulator misuse: %s", message)

    def inject(self, call: str, times: int, error: str) -> None:
        """Make the next `times` calls of `call` fail with `error`."""
        with self.lock:
            self._failures.setdefault(call, []).extend([error] * times)

    def take_failure(self, call: str) -> str | None:
        """The error the current call of `call` must fail with, if one was injected."""
        with self.lock:
            pending = self._failures.get(call)
            if not pending:
                return None
            return pending.pop(0)

    # Object counts for objects Python's garbage collector frees (engines, contexts)

    def created(self, kind: str) -> None:
        """Count one more live object of `kind`."""
        with self.lock:
            self._objects[kind] += 1

    def destroyed(self, kind: str) -> None:
        """Count one fewer live object of `kind` (called from finalizers)."""
        with self.lock:
            self._objects[kind] -= 1

    def object_counts(self) -> dict[str, int]:
        """Live engines and contexts, after a garbage collection so dropped ones are gone."""
        gc.collect()
        with self.lock:
            return {kind: count for kind, count in self._objects.items() if count}

    # Per-thread CUDA state

    @property
    def current_device(self) -> int:
        """The calling thread's current device (cudaSetDevice)."""
        return self._thread.device

    @current_device.setter
    def current_device(self, device: int) -> None:
        self._thread.device = device

    @property
    def host_time(self) -> float:
        """The calling thread's virtual clock: when it enqueues, work cannot start earlier."""
        return self._thread.host_time

    def advance_host_time(self, until: float) -> None:
        """A synchronization returned: the calling thread's clock moves to the end of what it waited for."""
        self._thread.host_time = max(self._thread.host_time, until)

    def device_info(self, device: int) -> DeviceInfo | None:
        """The device's identity, or None for an index out of range."""
        if 0 <= device < len(self.devices):
            return self.devices[device]
        return None
