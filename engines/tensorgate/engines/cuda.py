"""A small typed layer over cuda-python's `cuda.bindings.runtime`: checked calls and owning wrappers.

Every cudart call returns a tuple whose first item is a `cudaError_t`; `CudaRuntime.check` turns any error into a
`CudaError` naming the call and the error (as `cudaGetErrorName` spells it), so no return code goes unread. The
wrappers (Stream, Event, PinnedBuffer, DeviceBuffer, Graph, GraphExec) own one CUDA object each and free it in an
idempotent `close()`.

The runtime module is passed in rather than imported here, so this module imports without cuda-python and tests can
hand in the CPU simulator's fake. The current device is per host thread in CUDA: call `set_device` in every thread
that uses a device before anything else.
"""

# The Protocol below mirrors cudart's own names (cudaMalloc, devPtr, ...), so that the real module fits it.
# ruff: noqa: N802, N803, N815

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

import numpy as np
import numpy.typing as npt

from tensorgate.engines.base import EngineError

if TYPE_CHECKING:
    from cuda.bindings import runtime as _rt

__all__ = [
    "CudaError",
    "CudaRuntime",
    "CudartModule",
    "DeviceBuffer",
    "Event",
    "Graph",
    "GraphExec",
    "PinnedBuffer",
    "Stream",
]

T = TypeVar("T")


class CudartModule(Protocol):
    """The part of `cuda.bindings.runtime` this module calls (the real module and the simulator's fake both fit)."""

    cudaError_t: type[_rt.cudaError_t]
    cudaMemcpyKind: type[_rt.cudaMemcpyKind]
    cudaStreamCaptureMode: type[_rt.cudaStreamCaptureMode]
    cudaStreamNonBlocking: int
    cudaEventDisableTiming: int
    cudaHostAllocDefault: int

    def cudaGetErrorName(self, error: _rt.cudaError_t) -> tuple[_rt.cudaError_t, bytes]: ...
    def cudaGetDeviceCount(self) -> tuple[_rt.cudaError_t, int]: ...
    def cudaSetDevice(self, device: int) -> tuple[_rt.cudaError_t]: ...
    def cudaGetDeviceProperties(self, device: int) -> tuple[_rt.cudaError_t, _rt.cudaDeviceProp]: ...
    def cudaDeviceSynchronize(self) -> tuple[_rt.cudaError_t]: ...
    def cudaMalloc(self, size: int) -> tuple[_rt.cudaError_t, int]: ...
    def cudaFree(self, devPtr: int) -> tuple[_rt.cudaError_t]: ...
    def cudaHostAlloc(self, size: int, flags: int) -> tuple[_rt.cudaError_t, int]: ...
    def cudaFreeHost(self, ptr: int) -> tuple[_rt.cudaError_t]: ...
    def cudaMemcpyAsync(
        self, dst: int, src: int, count: int, kind: _rt.cudaMemcpyKind, stream: _rt._Stream
    ) -> tuple[_rt.cudaError_t]: ...
    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[_rt.cudaError_t, _rt.cudaStream_t]: ...
    def cudaStreamDestroy(self, stream: _rt._Stream) -> tuple[_rt.cudaError_t]: ...
    def cudaStreamSynchronize(self, stream: _rt._Stream) -> tuple[_rt.cudaError_t]: ...
    def cudaStreamWaitEvent(
        self, stream: _rt._Stream, event: _rt.cudaEvent_t, flags: int
    ) -> tuple[_rt.cudaError_t]: ...
    def cudaEventCreateWithFlags(self, flags: int) -> tuple[_rt.cudaError_t, _rt.cudaEvent_t]: ...
    def cudaEventDestroy(self, event: _rt.cudaEvent_t) -> tuple[_rt.cudaError_t]: ...
    def cudaEventRecord(self, event: _rt.cudaEvent_t, stream: _rt._Stream) -> tuple[_rt.cudaError_t]: ...
    def cudaEventSynchronize(self, event: _rt.cudaEvent_t) -> tuple[_rt.cudaError_t]: ...
    def cudaStreamBeginCapture(
        self, stream: _rt._Stream, mode: _rt.cudaStreamCaptureMode
    ) -> tuple[_rt.cudaError_t]: ...
    def cudaStreamEndCapture(self, stream: _rt._Stream) -> tuple[_rt.cudaError_t, _rt.cudaGraph_t]: ...
    def cudaGraphInstantiate(
        self, graph: _rt.cudaGraph_t, flags: int
    ) -> tuple[_rt.cudaError_t, _rt.cudaGraphExec_t]: ...
    def cudaGraphLaunch(self, graphExec: _rt.cudaGraphExec_t, stream: _rt._Stream) -> tuple[_rt.cudaError_t]: ...
    def cudaGraphExecDestroy(self, graphExec: _rt.cudaGraphExec_t) -> tuple[_rt.cudaError_t]: ...
    def cudaGraphDestroy(self, graph: _rt.cudaGraph_t) -> tuple[_rt.cudaError_t]: ...


class CudaError(EngineError):
    """A CUDA runtime call failed: `call` names it, `error` is the cudaError_t's name (cudaErrorMemoryAllocation)."""

    def __init__(self, call: str, error: str) -> None:
        super().__init__(f"{call} failed: {error}")
        self.call = call
        self.error = error


class CudaRuntime:
    """Checked calls into one cudart module, and factories for the owning wrappers."""

    def __init__(self, cudart: CudartModule) -> None:
        self.rt = cudart
        self._success = cudart.cudaError_t.cudaSuccess

    def error_name(self, error: _rt.cudaError_t) -> str:
        """The name of `error` as cudaGetErrorName gives it (the enum's name if even that call fails)."""
        try:
            status, name = self.rt.cudaGetErrorName(error)
        except Exception:  # a name for the message must never hide the error itself
            status, name = error, b""
        if status == self._success and name:
            return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return getattr(error, "name", None) or f"cudaError {int(error)}"

    @overload
    def check(self, call: str, result: tuple[_rt.cudaError_t]) -> None: ...
    @overload
    def check(self, call: str, result: tuple[_rt.cudaError_t, T]) -> T: ...
    def check(self, call: str, result: tuple[Any, ...]) -> Any:
        """Raise CudaError naming `call` unless `result[0]` is cudaSuccess; return the call's one output, if any."""
        error = result[0]
        if error != self._success:
            raise CudaError(call, self.error_name(error))
        return result[1] if len(result) > 1 else None

    # Devices.
    def device_count(self) -> int:
        """How many GPUs CUDA sees; 0 when there is no driver or no device (those are not errors here)."""
        error, count = self.rt.cudaGetDeviceCount()
        return int(count) if error == self._success and count else 0

    def set_device(self, device: int) -> None:
        """Make `device` current for the calling thread (CUDA keeps the current device per host thread)."""
        self.check(f"cudaSetDevice({device})", self.rt.cudaSetDevice(device))

    def device_name(self, device: int) -> str:
        """The GPU's marketing name, e.g. "NVIDIA H100 80GB HBM3"."""
        props = self.check(f"cudaGetDeviceProperties({device})", self.rt.cudaGetDeviceProperties(device))
        name = props.name
        text = name.split(b"\0", 1)[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
        return text.strip()

    def compute_capability(self, device: int) -> tuple[int, int]:
        """(major, minor), e.g. (9, 0) for sm_90."""
        props = self.check(f"cudaGetDeviceProperties({device})", self.rt.cudaGetDeviceProperties(device))
        return int(props.major), int(props.minor)

    def synchronize_device(self) -> None:
        """Wait for all work on the current device."""
        self.check("cudaDeviceSynchronize", self.rt.cudaDeviceSynchronize())

    # Owning wrappers.
    def stream(self) -> Stream:
        """A new non-blocking stream (no implicit synchronization with the legacy default stream)."""
        handle = self.check(
            "cudaStreamCreateWithFlags", self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking)
        )
        return Stream(self, handle)

    def event(self) -> Event:
        """A new event with timing disabled (the cheapest kind to record and wait on)."""
        handle = self.check(
            "cudaEventCreateWithFlags", self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming)
        )
        return Event(self, handle)

    def pinned(self, nbytes: int) -> PinnedBuffer:
        """`nbytes` of page-locked host memory (at least one byte, so every buffer has an address)."""
        size = max(nbytes, 1)
        pointer = self.check(f"cudaHostAlloc({size} bytes)", self.rt.cudaHostAlloc(size, self.rt.cudaHostAllocDefault))
        return PinnedBuffer(self, int(pointer), size)

    def device_buffer(self, nbytes: int) -> DeviceBuffer:
        """`nbytes` of memory on the current device (at least one byte)."""
        size = max(nbytes, 1)
        pointer = self.check(f"cudaMalloc({size} bytes)", self.rt.cudaMalloc(size))
        return DeviceBuffer(self, int(pointer), size)


class _Owned:
    """One CUDA object with an idempotent close(): the object is released at most once, even if that fails."""

    def __init__(self, cuda: CudaRuntime) -> None:
        self._cuda = cuda
        self.closed = False

    def _alive(self, what: str) -> None:
        if self.closed:
            raise EngineError(f"{what} used after close()")

    def close(self) -> None:
        """Release the object; a second call does nothing. Raises CudaError if the release call fails."""
        if not self.closed:
            self.closed = True
            self._release()

    def _release(self) -> None:
        raise NotImplementedError


class Stream(_Owned):
    """A CUDA stream."""

    def __init__(self, cuda: CudaRuntime, handle: _rt.cudaStream_t) -> None:
        super().__init__(cuda)
        self.handle = handle

    def synchronize(self) -> None:
        """Block the calling thread until everything queued on the stream has run."""
        self._alive("stream")
        self._cuda.check("cudaStreamSynchronize", self._cuda.rt.cudaStreamSynchronize(self.handle))

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for `event` (a device-side wait; the host does not block)."""
        self._alive("stream")
        self._cuda.check("cudaStreamWaitEvent", self._cuda.rt.cudaStreamWaitEvent(self.handle, event.handle, 0))

    def copy_to_device(self, dst: DeviceBuffer, src: PinnedBuffer, nbytes: int) -> None:
        """Queue an async host-to-device copy of `nbytes` (a no-op for 0)."""
        self._alive("stream")
        if nbytes:
            rt = self._cuda.rt
            kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._cuda.check(
                "cudaMemcpyAsync(host to device)",
                rt.cudaMemcpyAsync(dst.pointer, src.pointer, nbytes, kind, self.handle),
            )

    def copy_to_host(self, dst: PinnedBuffer, src: DeviceBuffer, nbytes: int) -> None:
        """Queue an async device-to-host copy of `nbytes` (a no-op for 0)."""
        self._alive("stream")
        if nbytes:
            rt = self._cuda.rt
            kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._cuda.check(
                "cudaMemcpyAsync(device to host)",
                rt.cudaMemcpyAsync(dst.pointer, src.pointer, nbytes, kind, self.handle),
            )

    def begin_capture(self) -> None:
        """Start recording this stream's work into a graph. Thread-local mode: other threads' CUDA calls (other
        contexts enqueueing, completion threads waiting) stay legal meanwhile."""
        self._alive("stream")
        mode = self._cuda.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        self._cuda.check("cudaStreamBeginCapture", self._cuda.rt.cudaStreamBeginCapture(self.handle, mode))

    def end_capture(self) -> Graph:
        """Stop recording; the graph of what was captured."""
        self._alive("stream")
        graph = self._cuda.check("cudaStreamEndCapture", self._cuda.rt.cudaStreamEndCapture(self.handle))
        return Graph(self._cuda, graph)

    def _release(self) -> None:
        self._cuda.check("cudaStreamDestroy", self._cuda.rt.cudaStreamDestroy(self.handle))


class Event(_Owned):
    """A CUDA event (timing disabled)."""

    def __init__(self, cuda: CudaRuntime, handle: _rt.cudaEvent_t) -> None:
        super().__init__(cuda)
        self.handle = handle

    def record(self, stream: Stream) -> None:
        """Mark the point reached by `stream`'s queued work."""
        self._alive("event")
        self._cuda.check("cudaEventRecord", self._cuda.rt.cudaEventRecord(self.handle, stream.handle))

    def synchronize(self) -> None:
        """Block the calling thread until the recorded work has run."""
        self._alive("event")
        self._cuda.check("cudaEventSynchronize", self._cuda.rt.cudaEventSynchronize(self.handle))

    def _release(self) -> None:
        self._cuda.check("cudaEventDestroy", self._cuda.rt.cudaEventDestroy(self.handle))


class PinnedBuffer(_Owned):
    """Page-locked host memory, with a numpy byte view over it for filling and reading."""

    def __init__(self, cuda: CudaRuntime, pointer: int, nbytes: int) -> None:
        super().__init__(cuda)
        self.pointer = pointer
        self.nbytes = nbytes
        self._bytes: npt.NDArray[np.uint8] | None = np.frombuffer(
            memoryview((ctypes.c_char * nbytes).from_address(pointer)).cast("B"), dtype=np.uint8
        )

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
        """The leading bytes as an array of `dtype` and `shape` (no copy: it aliases the pinned memory)."""
        if self._bytes is None:
            raise EngineError("pinned buffer used after close()")
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * dtype.itemsize
        if nbytes > self.nbytes:
            raise EngineError(f"{list(shape)} of {dtype} needs {nbytes} bytes; the pinned buffer has {self.nbytes}")
        return self._bytes[:nbytes].view(dtype).reshape(shape)

    def _release(self) -> None:
        # Drop our view first: the memory is gone after cudaFreeHost and must not be read through it.
        self._bytes = None
        self._cuda.check("cudaFreeHost", self._cuda.rt.cudaFreeHost(self.pointer))


class DeviceBuffer(_Owned):
    """Memory on a GPU (never read from the host: only its address is used)."""

    def __init__(self, cuda: CudaRuntime, pointer: int, nbytes: int) -> None:
        super().__init__(cuda)
        self.pointer = pointer
        self.nbytes = nbytes

    def _release(self) -> None:
        self._cuda.check("cudaFree", self._cuda.rt.cudaFree(self.pointer))


class Graph(_Owned):
    """A captured CUDA graph (a template; `instantiate` makes it launchable)."""

    def __init__(self, cuda: CudaRuntime, handle: _rt.cudaGraph_t) -> None:
        super().__init__(cuda)
        self.handle = handle

    def instantiate(self) -> GraphExec:
        """An executable instance of this graph."""
        self._alive("graph")
        handle = self._cuda.check("cudaGraphInstantiate", self._cuda.rt.cudaGraphInstantiate(self.handle, 0))
        return GraphExec(self._cuda, handle)

    def _release(self) -> None:
        self._cuda.check("cudaGraphDestroy", self._cuda.rt.cudaGraphDestroy(self.handle))


class GraphExec(_Owned):
    """An instantiated CUDA graph, launched on a stream in one call."""

    def __init__(self, cuda: CudaRuntime, handle: _rt.cudaGraphExec_t) -> None:
        super().__init__(cuda)
        self.handle = handle

    def launch(self, stream: Stream) -> None:
        """Queue the whole graph on `stream`."""
        self._alive("graph")
        self._cuda.check("cudaGraphLaunch", self._cuda.rt.cudaGraphLaunch(self.handle, stream.handle))

    def _release(self) -> None:
        self._cuda.check("cudaGraphExecDestroy", self._cuda.rt.cudaGraphExecDestroy(self.handle))
