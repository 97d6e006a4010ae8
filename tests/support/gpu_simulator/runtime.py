# ruff: noqa: N801, N802, N803, N815, N816
# (the fake keeps cuda-python's names: cudaStream_t, cudaMalloc(devPtr), ...)
"""The fake `cuda.bindings.runtime` module: cuda-python's calling conventions over the simulated machine.

Every call returns a tuple whose first item is a `cudaError_t` and whose other items are None on error, as
cuda-python's do. A stream may be given as a `cudaStream_t` or its integer handle. Misuse (unknown or destroyed
handles, freed or foreign pointers, copies out of bounds) returns the error code CUDA would and is recorded in
`SimState.misuse`.
"""

from __future__ import annotations

import ctypes
import enum
import operator
import types
from collections.abc import Callable
from typing import Any

from tests.support.gpu_simulator.core import Fault, SimState
from tests.support.gpu_simulator.memory import Memory
from tests.support.gpu_simulator.streams import Event, Graph, GraphExec, Node, Scheduler, Stream

__all__ = [
    "CudaRuntime",
    "build_module",
    "cudaDeviceProp",
    "cudaError_t",
    "cudaEvent_t",
    "cudaGraphExec_t",
    "cudaGraph_t",
    "cudaMemcpyKind",
    "cudaStreamCaptureMode",
    "cudaStream_t",
]


class cudaError_t(enum.IntEnum):
    """cuda-python's error codes (the values are CUDA's)."""

    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900


class cudaMemcpyKind(enum.IntEnum):
    """Copy directions."""

    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):
    """Stream capture modes (the simulator treats them alike)."""

    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class _Handle:
    """An opaque CUDA handle: `int(handle)` is its value, as with cuda-python's handle types."""

    def __init__(self, init_value: int = 0) -> None:
        self._value = operator.index(init_value)
        self._holder = ctypes.c_uint64(self._value)

    def __int__(self) -> int:
        return self._value

    def getPtr(self) -> int:
        """The address of the handle's storage (cuda-python's getPtr)."""
        return ctypes.addressof(self._holder)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and type(other) is type(self) and int(other) == self._value

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._value))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._value:#x}>"


class cudaStream_t(_Handle):
    """A stream handle (0 is the default stream)."""


class cudaEvent_t(_Handle):
    """An event handle."""


class cudaGraph_t(_Handle):
    """A captured graph's handle."""


class cudaGraphExec_t(_Handle):
    """An instantiated graph's handle."""


class cudaDeviceProp:
    """The device properties tensorgate reads."""

    def __init__(self) -> None:
        self.name = b""
        self.major = 0
        self.minor = 0
        self.totalGlobalMem = 0


cudaStreamNonBlocking = 1
cudaEventDisableTiming = 2
cudaHostAllocDefault = 0
cudaHostAllocPortable = 1

_OK = cudaError_t.cudaSuccess
_BAD = cudaError_t.cudaErrorInvalidValue
_BAD_HANDLE = cudaError_t.cudaErrorInvalidResourceHandle
_CAPTURE = cudaError_t.cudaErrorStreamCaptureUnsupported
_FAULT = cudaError_t.cudaErrorLaunchFailure

_COPY_KINDS = {
    cudaMemcpyKind.cudaMemcpyHostToHost: (False, False, "h2h"),
    cudaMemcpyKind.cudaMemcpyHostToDevice: (False, True, "h2d"),
    cudaMemcpyKind.cudaMemcpyDeviceToHost: (True, False, "d2h"),
    cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True, "d2d"),
}


class CudaRuntime:
    """The implementation behind the fake module's functions; one per simulator."""

    def __init__(self, state: SimState, memory: Memory, scheduler: Scheduler) -> None:
        self._state = state
        self._memory = memory
        self._scheduler = scheduler

    # Helpers shared with the fake TensorRT

    def _failure(self, call: str) -> cudaError_t | None:
        error = self._state.take_failure(call)
        return None if error is None else cudaError_t[error]

    def _misuse(self, error: cudaError_t, message: str) -> cudaError_t:
        self._state.record_misuse(message)
        return error

    def resolve_stream(self, stream: object, call: str) -> Stream | str:
        """The stream a handle names, or a message saying why it names none."""
        if stream is None:  # cuda-python reads None as the default stream
            handle = 0
        elif isinstance(stream, cudaStream_t):
            handle = int(stream)
        elif isinstance(stream, int) and not isinstance(stream, bool):
            handle = stream
        else:
            raise TypeError(f"{call}: expected a cudaStream_t or int stream handle, got {type(stream).__name__}")
        if handle in (0, 1, 2):  # the default, legacy and per-thread default streams
            return self._scheduler.default_stream(self._state.current_device)
        found = self._scheduler.streams.get(handle)
        if found is None:
            return f"{call}: unknown stream handle {handle:#x}"
        if found.destroyed:
            return f"{call}: stream {handle:#x} was destroyed"
        return found

    def _event(self, event: object, call: str) -> Event | str:
        if isinstance(event, cudaEvent_t):
            handle = int(event)
        elif isinstance(event, int) and not isinstance(event, bool):
            handle = event
        else:
            raise TypeError(f"{call}: expected a cudaEvent_t, got {type(event).__name__}")
        found = self._scheduler.events.get(handle)
        if found is None:
            return f"{call}: unknown event handle {handle:#x}"
        if found.destroyed:
            return f"{call}: event {handle:#x} was destroyed"
        return found

    def _synchronized(self, faults: list[str]) -> tuple[cudaError_t]:
        # Work that faulted when it ran reports as a launch failure to whoever waited for it, as on a GPU.
        return (_FAULT,) if faults else (_OK,)

    # Errors and devices

    def cudaGetErrorName(self, error: cudaError_t) -> tuple[cudaError_t, bytes | None]:
        if (failed := self._failure("cudaGetErrorName")) is not None:
            return (failed, None)
        try:
            return (_OK, cudaError_t(error).name.encode())
        except ValueError:
            return (_BAD, None)

    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int | None]:
        with self._state.lock:
            if (failed := self._failure("cudaGetDeviceCount")) is not None:
                return (failed, None)
            if not self._state.devices:
                return (cudaError_t.cudaErrorNoDevice, None)
            return (_OK, len(self._state.devices))

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaSetDevice")) is not None:
                return (failed,)
            if self._state.device_info(device) is None:
                return (self._misuse(cudaError_t.cudaErrorInvalidDevice, f"cudaSetDevice({device}): no such device"),)
            self._state.current_device = device
            return (_OK,)

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, cudaDeviceProp | None]:
        with self._state.lock:
            if (failed := self._failure("cudaGetDeviceProperties")) is not None:
                return (failed, None)
            info = self._state.device_info(device)
            if info is None:
                message = f"cudaGetDeviceProperties({device}): no such device"
                return (self._misuse(cudaError_t.cudaErrorInvalidDevice, message), None)
            prop = cudaDeviceProp()
            prop.name = info.name.encode()
            prop.major, prop.minor = info.compute_capability
            prop.totalGlobalMem = info.total_memory
            return (_OK, prop)

    def cudaDeviceSynchronize(self) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaDeviceSynchronize")) is not None:
                return (failed,)
            streams = self._device_streams(self._state.current_device)
            if any(s.capture is not None for s in streams):
                return (self._misuse(_CAPTURE, "cudaDeviceSynchronize while a stream is capturing"),)
            return self._synchronized(self._scheduler.run_streams(streams))

    def _device_streams(self, device: int) -> list[Stream]:
        streams = [s for s in self._scheduler.streams.values() if s.device == device]
        default = self._scheduler.default_streams.get(device)
        return [*streams, default] if default is not None else streams

    # Memory

    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int | None]:
        with self._state.lock:
            if (failed := self._failure("cudaMalloc")) is not None:
                return (failed, None)
            if size < 0:
                return (self._misuse(_BAD, f"cudaMalloc({size}): negative size"), None)
            device = self._state.current_device
            info = self._state.devices[device]
            used = sum(a.size for a in self._memory.live_device() if a.device == device)
            if used + size > info.total_memory:
                return (cudaError_t.cudaErrorMemoryAllocation, None)
            return (_OK, self._memory.malloc(device, size))

    def cudaFree(self, devPtr: int) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaFree")) is not None:
                return (failed,)
            # cudaFree waits for the device's queued work first, as CUDA does.
            self._scheduler.run_streams(self._device_streams(self._state.current_device))
            problem = self._memory.free(devPtr)
            return (self._misuse(_BAD, problem),) if problem else (_OK,)

    def cudaHostAlloc(self, size: int, flags: int) -> tuple[cudaError_t, int | None]:
        with self._state.lock:
            if (failed := self._failure("cudaHostAlloc")) is not None:
                return (failed, None)
            if size < 0:
                return (self._misuse(_BAD, f"cudaHostAlloc({size}): negative size"), None)
            return (_OK, self._memory.host_alloc(size))

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaFreeHost")) is not None:
                return (failed,)
            self._scheduler.run_streams(self._device_streams(self._state.current_device))
            problem = self._memory.free_host(ptr)
            return (self._misuse(_BAD, problem),) if problem else (_OK,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaMemcpyAsync")) is not None:
                return (failed,)
            target = self.resolve_stream(stream, "cudaMemcpyAsync")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            dst, src, count = operator.index(dst), operator.index(src), operator.index(count)
            try:
                copy_kind = cudaMemcpyKind(kind)
            except ValueError:
                return (self._misuse(_BAD, f"cudaMemcpyAsync: {kind!r} is not a cudaMemcpyKind"),)
            src_device, dst_device = self._memory.is_device(src), self._memory.is_device(dst)
            if copy_kind != cudaMemcpyKind.cudaMemcpyDefault:
                want_src, want_dst, _ = _COPY_KINDS[copy_kind]
                if (src_device, dst_device) != (want_src, want_dst):
                    message = (
                        f"cudaMemcpyAsync({copy_kind.name}): source {src:#x} is "
                        f"{'device' if src_device else 'host'} memory and destination {dst:#x} is "
                        f"{'device' if dst_device else 'host'} memory"
                    )
                    return (self._misuse(_BAD, message),)
            label = next(n for s, d, n in _COPY_KINDS.values() if (s, d) == (src_device, dst_device))
            if count == 0:
                return (_OK,)
            what = f"cudaMemcpyAsync {label} of {count} bytes on stream {target.handle:#x}"
            try:
                self._check(src, count, what)
                self._check(dst, count, what)
            except Fault as fault:
                return (self._misuse(_BAD, str(fault)),)
            memory = self._memory

            def copy() -> None:
                memory.write(dst, memory.read(src, count, what), what)

            node = Node(label, f"{label} {count} B", self._state.costs.copy(count), copy)
            self._scheduler.enqueue(target, [node], kind=label, label=node.label)
            return (_OK,)

    def _check(self, ptr: int, count: int, what: str) -> None:
        if self._memory.is_device(ptr):
            self._memory.device_allocation(ptr, count, what)
        else:
            self._memory.host_allocation(ptr, count, what)

    # Streams and events

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaStream_t | None]:
        with self._state.lock:
            if (failed := self._failure("cudaStreamCreateWithFlags")) is not None:
                return (failed, None)
            return (_OK, cudaStream_t(self._scheduler.create_stream(self._state.current_device, flags).handle))

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaStreamDestroy")) is not None:
                return (failed,)
            target = self.resolve_stream(stream, "cudaStreamDestroy")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            if target.handle == 0:
                return (self._misuse(_BAD_HANDLE, "cudaStreamDestroy of the default stream"),)
            if target.capture is not None:
                self._state.record_misuse(f"cudaStreamDestroy of stream {target.handle:#x} while capturing")
            # Queued work still completes (CUDA finishes it); it runs when something waits for it.
            target.destroyed = True
            return (_OK,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaStreamSynchronize")) is not None:
                return (failed,)
            target = self.resolve_stream(stream, "cudaStreamSynchronize")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            if target.capture is not None:
                return (self._misuse(_CAPTURE, f"cudaStreamSynchronize of capturing stream {target.handle:#x}"),)
            return self._synchronized(self._scheduler.run_through(target.last))

    def cudaStreamWaitEvent(self, stream: Any, event: Any, flags: int = 0) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaStreamWaitEvent")) is not None:
                return (failed,)
            target = self.resolve_stream(stream, "cudaStreamWaitEvent")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            found = self._event(event, "cudaStreamWaitEvent")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            if target.capture is not None:
                message = "cudaStreamWaitEvent during capture: the simulator captures single-stream graphs only"
                return (self._misuse(_CAPTURE, message),)
            self._scheduler.wait(target, found)
            return (_OK,)

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaEvent_t | None]:
        with self._state.lock:
            if (failed := self._failure("cudaEventCreateWithFlags")) is not None:
                return (failed, None)
            return (_OK, cudaEvent_t(self._scheduler.create_event(flags).handle))

    def cudaEventDestroy(self, event: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaEventDestroy")) is not None:
                return (failed,)
            found = self._event(event, "cudaEventDestroy")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            found.destroyed = True
            return (_OK,)

    def cudaEventRecord(self, event: Any, stream: Any = 0) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaEventRecord")) is not None:
                return (failed,)
            found = self._event(event, "cudaEventRecord")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            target = self.resolve_stream(stream, "cudaEventRecord")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            if target.capture is not None:
                message = "cudaEventRecord during capture: the simulator captures single-stream graphs only"
                return (self._misuse(_CAPTURE, message),)
            self._scheduler.record(found, target)
            return (_OK,)

    def cudaEventSynchronize(self, event: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaEventSynchronize")) is not None:
                return (failed,)
            found = self._event(event, "cudaEventSynchronize")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            return self._synchronized(self._scheduler.run_through(found.record))

    # Graphs

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaStreamBeginCapture")) is not None:
                return (failed,)
            target = self.resolve_stream(stream, "cudaStreamBeginCapture")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            if target.handle == 0:
                return (self._misuse(_CAPTURE, "cudaStreamBeginCapture on the default stream"),)
            if target.capture is not None:
                return (self._misuse(_BAD, f"cudaStreamBeginCapture: stream {target.handle:#x} already capturing"),)
            target.capture = []
            return (_OK,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[cudaError_t, cudaGraph_t | None]:
        with self._state.lock:
            if (failed := self._failure("cudaStreamEndCapture")) is not None:
                return (failed, None)
            target = self.resolve_stream(stream, "cudaStreamEndCapture")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target), None)
            if target.capture is None:
                return (self._misuse(_BAD, f"cudaStreamEndCapture: stream {target.handle:#x} is not capturing"), None)
            graph = self._scheduler.create_graph(target.device, target.capture)
            target.capture = None
            return (_OK, cudaGraph_t(graph.handle))

    def _graph(self, graph: Any, call: str) -> Graph | str:
        if not isinstance(graph, cudaGraph_t):
            raise TypeError(f"{call}: expected a cudaGraph_t, got {type(graph).__name__}")
        found = self._scheduler.graphs.get(int(graph))
        if found is None:
            return f"{call}: unknown graph handle {int(graph):#x}"
        if found.destroyed:
            return f"{call}: graph {int(graph):#x} was destroyed"
        return found

    def _graph_exec(self, graph_exec: Any, call: str) -> GraphExec | str:
        if not isinstance(graph_exec, cudaGraphExec_t):
            raise TypeError(f"{call}: expected a cudaGraphExec_t, got {type(graph_exec).__name__}")
        found = self._scheduler.graph_execs.get(int(graph_exec))
        if found is None:
            return f"{call}: unknown executable graph handle {int(graph_exec):#x}"
        if found.destroyed:
            return f"{call}: executable graph {int(graph_exec):#x} was destroyed"
        return found

    def cudaGraphInstantiate(self, graph: Any, flags: int = 0) -> tuple[cudaError_t, cudaGraphExec_t | None]:
        with self._state.lock:
            if (failed := self._failure("cudaGraphInstantiate")) is not None:
                return (failed, None)
            found = self._graph(graph, "cudaGraphInstantiate")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found), None)
            return (_OK, cudaGraphExec_t(self._scheduler.instantiate(found).handle))

    def cudaGraphLaunch(self, graphExec: Any, stream: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaGraphLaunch")) is not None:
                return (failed,)
            found = self._graph_exec(graphExec, "cudaGraphLaunch")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            target = self.resolve_stream(stream, "cudaGraphLaunch")
            if isinstance(target, str):
                return (self._misuse(_BAD_HANDLE, target),)
            if target.device != found.graph.device:
                message = (
                    f"cudaGraphLaunch: graph captured on device {found.graph.device} launched on a stream of "
                    f"device {target.device}"
                )
                return (self._misuse(_BAD, message),)
            extra = self._state.costs.graph_node_us
            nodes = [Node(n.kind, n.label, n.cost + extra, n.action) for n in found.nodes]
            label = f"graph {found.handle:#x}"
            self._scheduler.enqueue(target, nodes, kind="graph", label=label)
            return (_OK,)

    def cudaGraphExecDestroy(self, graphExec: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaGraphExecDestroy")) is not None:
                return (failed,)
            found = self._graph_exec(graphExec, "cudaGraphExecDestroy")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            found.destroyed = True
            found.nodes = []  # its nodes hold execution contexts: a destroyed graph must not keep them alive
            return (_OK,)

    def cudaGraphDestroy(self, graph: Any) -> tuple[cudaError_t]:
        with self._state.lock:
            if (failed := self._failure("cudaGraphDestroy")) is not None:
                return (failed,)
            found = self._graph(graph, "cudaGraphDestroy")
            if isinstance(found, str):
                return (self._misuse(_BAD_HANDLE, found),)
            found.destroyed = True
            found.nodes = []
            return (_OK,)


#: The fake module's functions: every public `cuda*` method of CudaRuntime.
FUNCTIONS = tuple(name for name in vars(CudaRuntime) if name.startswith("cuda"))


def build_module(runtime: CudaRuntime) -> types.ModuleType:
    """A module object standing in for `cuda.bindings.runtime`, bound to one simulator."""
    module = types.ModuleType("cuda.bindings.runtime", "Simulated cuda.bindings.runtime (tests only).")
    for name in FUNCTIONS:
        function: Callable[..., Any] = getattr(runtime, name)
        setattr(module, name, function)
    for value in (
        cudaError_t,
        cudaMemcpyKind,
        cudaStreamCaptureMode,
        cudaStream_t,
        cudaEvent_t,
        cudaGraph_t,
        cudaGraphExec_t,
        cudaDeviceProp,
    ):
        setattr(module, value.__name__, value)
    constants = {
        "cudaStreamNonBlocking": cudaStreamNonBlocking,
        "cudaEventDisableTiming": cudaEventDisableTiming,
        "cudaHostAllocDefault": cudaHostAllocDefault,
        "cudaHostAllocPortable": cudaHostAllocPortable,
    }
    for name, constant in constants.items():
        setattr(module, name, constant)
    return module
