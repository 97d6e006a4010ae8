"""tensorgate.engines.cuda on the CPU simulator: checked calls, owning wrappers, device helpers."""

from __future__ import annotations

import numpy as np
import pytest

from tensorgate.engines import EngineError
from tensorgate.engines.cuda import CudaError, CudaRuntime
from tests.support.gpu_simulator import GpuSimulator


@pytest.fixture
def cuda(gpu_simulator: GpuSimulator) -> CudaRuntime:
    runtime = CudaRuntime(gpu_simulator.cudart)  # the fake module fits the protocol
    runtime.set_device(0)
    return runtime


def test_check_returns_the_output_and_raises_naming_the_call_and_the_error(
    cuda: CudaRuntime, gpu_simulator: GpuSimulator
) -> None:
    buffer = cuda.device_buffer(16)
    assert buffer.pointer != 0
    buffer.close()
    gpu_simulator.fail_next("cudaMalloc")
    with pytest.raises(CudaError, match=r"^cudaMalloc\(32 bytes\) failed: cudaErrorMemoryAllocation$") as raised:
        cuda.device_buffer(32)
    assert isinstance(raised.value, EngineError)
    assert (raised.value.call, raised.value.error) == ("cudaMalloc(32 bytes)", "cudaErrorMemoryAllocation")


def test_device_helpers(cuda: CudaRuntime, gpu_simulator: GpuSimulator) -> None:
    assert cuda.device_count() == 1
    assert cuda.device_name(0) == "tensorgate simulated GPU"
    assert cuda.compute_capability(0) == (8, 9)
    with pytest.raises(CudaError, match=r"cudaSetDevice\(3\) failed: cudaErrorInvalidDevice"):
        cuda.set_device(3)
    gpu_simulator.misuse.clear()  # provoked on purpose


def test_no_device_counts_zero() -> None:
    simulator = GpuSimulator(devices=0)
    assert CudaRuntime(simulator.cudart).device_count() == 0


def test_round_trip_through_the_device_with_streams_and_events(cuda: CudaRuntime) -> None:
    copy_in, copy_out = cuda.stream(), cuda.stream()
    copied = cuda.event()
    source, target = cuda.pinned(64), cuda.pinned(64)
    device = cuda.device_buffer(64)
    data = np.arange(16, dtype=np.float32)
    np.copyto(source.view(np.dtype(np.float32), (16,)), data)
    copy_in.copy_to_device(device, source, 64)
    copied.record(copy_in)
    copy_out.wait(copied)  # without this the copy back would read the device buffer before it was written
    copy_out.copy_to_host(target, device, 64)
    copy_out.synchronize()
    np.testing.assert_array_equal(target.view(np.dtype(np.float32), (16,)), data)
    for item in (copy_in, copy_out, copied, source, target, device):
        item.close()
        item.close()  # idempotent: a second close frees nothing twice (the simulator would record a double free)


def test_a_closed_wrapper_refuses_use(cuda: CudaRuntime) -> None:
    pinned = cuda.pinned(8)
    with pytest.raises(EngineError, match="needs 16 bytes; the pinned buffer has 8"):
        pinned.view(np.dtype(np.float32), (4,))
    pinned.close()
    with pytest.raises(EngineError, match="after close"):
        pinned.view(np.dtype(np.uint8), (8,))
    stream = cuda.stream()
    stream.close()
    with pytest.raises(EngineError, match="stream used after close"):
        stream.synchronize()


def test_a_captured_graph_replays_its_copy(cuda: CudaRuntime) -> None:
    stream = cuda.stream()
    source, target = cuda.pinned(4), cuda.pinned(4)
    device = cuda.device_buffer(4)
    stream.begin_capture()
    stream.copy_to_device(device, source, 4)
    graph = stream.end_capture()
    graph_exec = graph.instantiate()
    for value in (3, 9):
        source.view(np.dtype(np.int32), (1,))[0] = value
        graph_exec.launch(stream)
        stream.copy_to_host(target, device, 4)
        stream.synchronize()
        assert target.view(np.dtype(np.int32), (1,))[0] == value
    for item in (graph_exec, graph, stream, source, target, device):
        item.close()
