"""The GPU simulator makes wrong orchestration fail: stale memory, early buffer reuse, leaks, misuse, injected errors.

These tests check the simulator (tests/support/gpu_simulator), which verifies tensorgate's orchestration of the
TensorRT and CUDA APIs; nothing here says anything about TensorRT or CUDA themselves.
"""

from __future__ import annotations

import ast
import ctypes
import inspect
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.support.gpu_simulator import GpuSimulator, TimelineEntry

IN, OUT, MAX_BATCH = 4, 3, 8
F32 = np.dtype(np.float32)


def mlp_model(path: Path) -> Path:
    """y = relu(x @ W + b) over [batch, 4] -> [batch, 3] float32 (IR 10, opset 17)."""
    rng = np.random.default_rng(7)
    weights = numpy_helper.from_array(rng.standard_normal((IN, OUT)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_model(tmp_path_factory.mktemp("sim") / "mlp.onnx")


@pytest.fixture(scope="module")
def reference(model_file: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])


def expected(session: ort.InferenceSession, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = session.run(None, {"x": x})[0]
    return result


def ok(result: tuple[Any, ...]) -> Any:
    """The output of a cudart call that must succeed."""
    assert int(result[0]) == 0, f"CUDA call failed: {result[0]!r}"
    return result[1] if len(result) > 1 else None


def build_plan(trt: Any, model_file: Path, *, max_batch: int = MAX_BATCH) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_file.read_bytes()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, IN), (max_batch // 2, IN), (max_batch, IN))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    return bytes(plan)


@dataclass
class Rig:
    """One execution context with pinned and device buffers, a copy stream and a compute stream."""

    sim: GpuSimulator
    engine: Any
    context: Any
    copy_stream: Any
    compute_stream: Any
    copied: Any
    computed: Any
    host_in: int
    host_out: int
    dev_in: int
    dev_out: int

    @property
    def rt(self) -> Any:
        return self.sim.cudart

    def pinned_in(self, batch: int) -> npt.NDArray[np.float32]:
        array = (ctypes.c_float * (batch * IN)).from_address(self.host_in)
        return np.ctypeslib.as_array(array).reshape(batch, IN)

    def pinned_out(self, batch: int) -> npt.NDArray[np.float32]:
        array = (ctypes.c_float * (batch * OUT)).from_address(self.host_out)
        return np.ctypeslib.as_array(array).reshape(batch, OUT)

    def enqueue(self, batch: int, *, wait: bool = True) -> None:
        """H2D on the copy stream -> (wait) -> execute on the compute stream -> D2H on the compute stream."""
        rt = self.rt
        ok(rt.cudaMemcpyAsync(self.dev_in, self.host_in, batch * IN * 4, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                              self.copy_stream))  # fmt: skip
        ok(rt.cudaEventRecord(self.copied, self.copy_stream))
        if wait:
            ok(rt.cudaStreamWaitEvent(self.compute_stream, self.copied, 0))
        assert self.context.set_input_shape("x", (batch, IN))
        assert self.context.set_tensor_address("x", self.dev_in)
        assert self.context.set_tensor_address("y", self.dev_out)
        assert self.context.execute_async_v3(int(self.compute_stream))
        ok(rt.cudaMemcpyAsync(self.host_out, self.dev_out, batch * OUT * 4, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                              self.compute_stream))  # fmt: skip
        ok(rt.cudaEventRecord(self.computed, self.compute_stream))

    def run(self, x: npt.NDArray[np.float32], *, wait: bool = True) -> npt.NDArray[np.float32]:
        batch = len(x)
        self.pinned_in(batch)[:] = x
        self.enqueue(batch, wait=wait)
        ok(self.rt.cudaEventSynchronize(self.computed))
        return self.pinned_out(batch).copy()

    def close(self) -> None:
        rt = self.rt
        ok(rt.cudaFreeHost(self.host_in))
        ok(rt.cudaFreeHost(self.host_out))
        ok(rt.cudaFree(self.dev_in))
        ok(rt.cudaFree(self.dev_out))
        ok(rt.cudaStreamDestroy(self.copy_stream))
        ok(rt.cudaStreamDestroy(self.compute_stream))
        ok(rt.cudaEventDestroy(self.copied))
        ok(rt.cudaEventDestroy(self.computed))


def make_rig(sim: GpuSimulator, plan: bytes) -> Rig:
    trt, rt = sim.tensorrt, sim.cudart
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    assert engine is not None
    context = engine.create_execution_context()
    assert context is not None
    return Rig(
        sim,
        engine,
        context,
        ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)),
        ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking)),
        ok(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming)),
        ok(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming)),
        ok(rt.cudaHostAlloc(MAX_BATCH * IN * 4, rt.cudaHostAllocDefault)),
        ok(rt.cudaHostAlloc(MAX_BATCH * OUT * 4, rt.cudaHostAllocDefault)),
        ok(rt.cudaMalloc(MAX_BATCH * IN * 4)),
        ok(rt.cudaMalloc(MAX_BATCH * OUT * 4)),
    )


@pytest.fixture
def plan(gpu_simulator: GpuSimulator, model_file: Path) -> bytes:
    return build_plan(gpu_simulator.tensorrt, model_file)


@pytest.fixture
def rig(gpu_simulator: GpuSimulator, plan: bytes) -> Iterator[Rig]:
    made = make_rig(gpu_simulator, plan)
    yield made
    made.close()


def batch(size: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((size, IN)).astype(np.float32)


# Correct orchestration gives ONNX Runtime's numbers; wrong orchestration gives wrong ones


def test_a_correct_sequence_gives_onnxruntime_numbers(rig: Rig, reference: ort.InferenceSession) -> None:
    for size in range(1, MAX_BATCH + 1):
        x = batch(size, seed=size)
        np.testing.assert_array_equal(rig.run(x), expected(reference, x))


def test_without_the_event_wait_compute_reads_stale_device_memory(rig: Rig, reference: ort.InferenceSession) -> None:
    # Fresh device memory is poison (NaN), so the first unsynchronized batch computes garbage...
    first = rig.run(batch(4, seed=1), wait=False)
    assert np.isnan(first).all()
    # ...and later ones compute on whatever the previous copy left there.
    previous = batch(4, seed=2)
    rig.run(previous)
    x = batch(4, seed=3)
    stale = rig.run(x, wait=False)
    np.testing.assert_array_equal(stale, expected(reference, previous))
    assert not np.array_equal(stale, expected(reference, x))


def test_overwriting_a_pinned_buffer_before_synchronizing_copies_the_new_contents(
    rig: Rig, reference: ort.InferenceSession
) -> None:
    x, overwritten = batch(4, seed=4), batch(4, seed=5)
    rig.pinned_in(4)[:] = x
    rig.enqueue(4)
    rig.pinned_in(4)[:] = overwritten  # too early: the H2D copy has not run yet
    ok(rig.rt.cudaEventSynchronize(rig.computed))
    np.testing.assert_array_equal(rig.pinned_out(4), expected(reference, overwritten))


def test_outputs_appear_in_pinned_memory_only_after_synchronization(rig: Rig, reference: ort.InferenceSession) -> None:
    x = batch(2, seed=6)
    rig.pinned_in(2)[:] = x
    rig.pinned_out(2)[:] = 0
    rig.enqueue(2)
    assert (rig.pinned_out(2) == 0).all()
    ok(rig.rt.cudaStreamSynchronize(rig.compute_stream))
    np.testing.assert_array_equal(rig.pinned_out(2), expected(reference, x))


def test_concurrent_contexts_on_threads_each_get_their_own_numbers(
    gpu_simulator: GpuSimulator, plan: bytes, reference: ort.InferenceSession
) -> None:
    rigs = [make_rig(gpu_simulator, plan) for _ in range(3)]
    mismatches: list[str] = []

    def work(index: int) -> None:
        for step in range(5):
            x = batch(1 + (index + step) % MAX_BATCH, seed=100 * index + step)
            if not np.array_equal(rigs[index].run(x), expected(reference, x)):
                mismatches.append(f"rig {index} step {step}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(rigs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for made in rigs:
        made.close()
    assert mismatches == []


# Misuse, leaks and poisoning


def test_double_free_use_after_free_and_unknown_handles_are_misuse(gpu_simulator: GpuSimulator) -> None:
    rt = gpu_simulator.cudart
    device = ok(rt.cudaMalloc(64))
    host = ok(rt.cudaHostAlloc(64, 0))
    stream = ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
    ok(rt.cudaFree(device))
    assert rt.cudaFree(device) == (rt.cudaError_t.cudaErrorInvalidValue,)
    copy = rt.cudaMemcpyAsync(device, host, 64, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)
    assert copy == (rt.cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaStreamSynchronize(0xBAD) == (rt.cudaError_t.cudaErrorInvalidResourceHandle,)
    assert rt.cudaEventSynchronize(rt.cudaEvent_t(0xBAD)) == (rt.cudaError_t.cudaErrorInvalidResourceHandle,)
    ok(rt.cudaStreamDestroy(stream))
    assert rt.cudaStreamSynchronize(stream) == (rt.cudaError_t.cudaErrorInvalidResourceHandle,)
    ok(rt.cudaFreeHost(host))
    assert rt.cudaFreeHost(host) == (rt.cudaError_t.cudaErrorInvalidValue,)
    found = "\n".join(gpu_simulator.misuse)
    assert found.count("double free") == 2
    assert "use after free" in found
    assert "unknown stream handle" in found
    assert "unknown event handle" in found
    assert "was destroyed" in found
    gpu_simulator.misuse.clear()


def test_copies_out_of_bounds_or_from_pageable_memory_are_refused(gpu_simulator: GpuSimulator) -> None:
    rt = gpu_simulator.cudart
    device = ok(rt.cudaMalloc(16))
    host = ok(rt.cudaHostAlloc(64, 0))
    pageable = np.zeros(16, np.float32)
    h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    assert rt.cudaMemcpyAsync(device, host, 64, h2d, 0) == (rt.cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaMemcpyAsync(device, pageable.ctypes.data, 16, h2d, 0) == (rt.cudaError_t.cudaErrorInvalidValue,)
    wrong_way = rt.cudaMemcpyAsync(device, host, 16, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, 0)
    assert wrong_way == (rt.cudaError_t.cudaErrorInvalidValue,)
    assert [m for m in gpu_simulator.misuse if "overrun" in m]
    assert [m for m in gpu_simulator.misuse if "not page-locked" in m]
    assert [m for m in gpu_simulator.misuse if "cudaMemcpyDeviceToHost" in m]
    gpu_simulator.misuse.clear()
    ok(rt.cudaFree(device))
    ok(rt.cudaFreeHost(host))


def test_freed_pinned_memory_is_poisoned_not_unmapped(gpu_simulator: GpuSimulator) -> None:
    rt = gpu_simulator.cudart
    host = ok(rt.cudaHostAlloc(16, 0))
    view = np.ctypeslib.as_array((ctypes.c_float * 4).from_address(host))
    view[:] = 1.0
    ok(rt.cudaFreeHost(host))
    assert np.isnan(view).all()


def test_a_leak_fails_assert_clean_and_freeing_it_passes() -> None:
    sim = GpuSimulator()
    rt = sim.cudart
    pointer = ok(rt.cudaMalloc(128))
    stream = ok(rt.cudaStreamCreateWithFlags(0))
    event = ok(rt.cudaEventCreateWithFlags(0))
    assert sim.live() | {"device": 1, "stream": 1, "event": 1} == sim.live()
    with pytest.raises(AssertionError, match=r"128-byte device allocation") as failure:
        sim.assert_clean()
    assert "1 stream(s)" in str(failure.value)
    assert "1 event(s)" in str(failure.value)
    ok(rt.cudaFree(pointer))
    ok(rt.cudaStreamDestroy(stream))
    ok(rt.cudaEventDestroy(event))
    sim.assert_clean()


def test_misuse_fails_assert_clean() -> None:
    sim = GpuSimulator()
    sim.cudart.cudaFree(0xD0_0000_0000_0001)
    with pytest.raises(AssertionError, match="unknown device pointer"):
        sim.assert_clean()


def test_engines_and_contexts_are_counted_until_dropped(gpu_simulator: GpuSimulator, plan: bytes) -> None:
    trt = gpu_simulator.tensorrt
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    assert (gpu_simulator.live()["engine"], gpu_simulator.live()["context"]) == (1, 1)
    del context, engine
    assert (gpu_simulator.live()["engine"], gpu_simulator.live()["context"]) == (0, 0)


# Profiles, execution preconditions, plans


def test_a_shape_outside_the_profile_is_refused(rig: Rig) -> None:
    assert rig.context.set_input_shape("x", (MAX_BATCH + 1, IN)) is False
    assert rig.context.set_input_shape("x", (2, IN + 1)) is False
    assert rig.context.set_input_shape("nope", (2, IN)) is False
    assert len([m for m in rig.sim.misuse if "shape outside profile" in m]) == 2
    assert any("not an input" in e for e in rig.sim.errors)
    rig.sim.misuse.clear()


def test_output_shape_follows_the_input_shape(rig: Rig) -> None:
    assert tuple(rig.context.get_tensor_shape("y")) == (-1, OUT)
    assert rig.context.set_input_shape("x", (5, IN))
    assert tuple(rig.context.get_tensor_shape("y")) == (5, OUT)
    assert tuple(rig.engine.get_tensor_shape("x")) == (-1, IN)
    assert [tuple(d) for d in rig.engine.get_tensor_profile_shape("x", 0)] == [(1, IN), (4, IN), (8, IN)]


def test_execute_needs_shapes_and_addresses_and_an_int_stream(rig: Rig) -> None:
    stream = int(rig.compute_stream)
    assert rig.context.execute_async_v3(stream) is False  # no input shape yet
    assert rig.context.set_input_shape("x", (2, IN))
    assert rig.context.execute_async_v3(stream) is False  # no addresses yet
    with pytest.raises(TypeError, match="int"):
        rig.context.execute_async_v3(rig.compute_stream)
    assert rig.context.set_tensor_address("x", rig.dev_in)
    assert rig.context.set_tensor_address("y", rig.host_out)  # host memory is not a device address
    assert rig.context.execute_async_v3(stream) is False
    assert any("shape not set" in m for m in rig.sim.misuse)
    assert any("address not set" in m for m in rig.sim.misuse)
    assert any("not device memory" in m for m in rig.sim.misuse)
    rig.sim.misuse.clear()


def test_building_needs_a_profile_for_dynamic_inputs(gpu_simulator: GpuSimulator, model_file: Path) -> None:
    trt = gpu_simulator.tensorrt
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse(model_file.read_bytes())
    assert (network.num_inputs, network.get_input(0).name, tuple(network.get_input(0).shape)) == (1, "x", (-1, IN))
    assert builder.build_serialized_network(network, builder.create_builder_config()) is None
    assert any("no optimization profile" in e for e in gpu_simulator.errors)


def test_a_plan_of_another_version_device_or_garbage_deserializes_to_none(
    gpu_simulator: GpuSimulator, plan: bytes
) -> None:
    trt = gpu_simulator.tensorrt
    runtime = trt.Runtime(trt.Logger())
    assert runtime.deserialize_cuda_engine(b"not a plan") is None
    gpu_simulator.trt_version = "11.0.0-sim"
    assert trt.__version__ == "11.0.0-sim"
    assert runtime.deserialize_cuda_engine(plan) is None
    assert any("expecting library version 11.0.0-sim got 10.13.0-sim" in e for e in gpu_simulator.errors)
    other = GpuSimulator(device_name="another GPU")
    assert other.tensorrt.Runtime(other.tensorrt.Logger()).deserialize_cuda_engine(plan) is None
    gpu_simulator.trt_version = "10.13.0-sim"
    engine = runtime.deserialize_cuda_engine(plan)
    assert engine is not None
    assert bytes(engine.serialize()) == plan


def test_the_timing_cache_records_builds(gpu_simulator: GpuSimulator, model_file: Path) -> None:
    trt = gpu_simulator.tensorrt
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse_from_file(str(model_file))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, IN), (2, IN), (4, IN))
    config.add_optimization_profile(profile)
    empty = config.create_timing_cache(b"")
    assert config.set_timing_cache(empty, False)
    assert builder.build_serialized_network(network, config) is not None
    saved = bytes(config.get_timing_cache().serialize())
    assert saved != bytes(empty.serialize()) or empty.entries  # the build added an entry
    gpu_simulator.trt_version = "11.0.0-sim"
    stale = config.create_timing_cache(saved)
    assert config.set_timing_cache(stale, False) is False
    assert config.set_timing_cache(stale, True)
    gpu_simulator.errors.clear()


def test_parse_errors_are_reported(gpu_simulator: GpuSimulator) -> None:
    trt = gpu_simulator.tensorrt
    logger = trt.Logger()
    parser = trt.OnnxParser(trt.Builder(logger).create_network(0), logger)
    assert parser.parse(b"garbage") is False
    assert parser.num_errors == 1
    assert "failed to parse" in parser.get_error(0).desc()


# Injected failures


def test_fail_next_makes_cudart_calls_fail(gpu_simulator: GpuSimulator) -> None:
    rt = gpu_simulator.cudart
    gpu_simulator.fail_next("cudaMalloc", times=2)
    assert rt.cudaMalloc(16) == (rt.cudaError_t.cudaErrorMemoryAllocation, None)
    assert rt.cudaMalloc(16) == (rt.cudaError_t.cudaErrorMemoryAllocation, None)
    pointer = ok(rt.cudaMalloc(16))
    gpu_simulator.fail_next("cudaFree", error="cudaErrorLaunchFailure")
    assert rt.cudaFree(pointer) == (rt.cudaError_t.cudaErrorLaunchFailure,)
    ok(rt.cudaFree(pointer))
    with pytest.raises(ValueError, match="not a cudaError_t"):
        gpu_simulator.fail_next("cudaMalloc", error="cudaErrorNope")
    with pytest.raises(ValueError, match="cannot inject"):
        gpu_simulator.fail_next("cudaNope")


def test_fail_next_makes_tensorrt_calls_fail(
    gpu_simulator: GpuSimulator, rig: Rig, plan: bytes, reference: ort.InferenceSession, model_file: Path
) -> None:
    trt = gpu_simulator.tensorrt
    gpu_simulator.fail_next("execute_async_v3")
    assert rig.context.set_input_shape("x", (1, IN))
    assert rig.context.set_tensor_address("x", rig.dev_in)
    assert rig.context.set_tensor_address("y", rig.dev_out)
    assert rig.context.execute_async_v3(int(rig.compute_stream)) is False
    gpu_simulator.fail_next("set_input_shape")
    assert rig.context.set_input_shape("x", (1, IN)) is False
    gpu_simulator.fail_next("create_execution_context")
    assert rig.engine.create_execution_context() is None
    gpu_simulator.fail_next("deserialize_cuda_engine")
    assert trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan) is None
    gpu_simulator.fail_next("build_serialized_network")
    with pytest.raises(AssertionError):
        build_plan(trt, model_file)
    gpu_simulator.fail_next("parse")
    with pytest.raises(AssertionError, match="injected parse failure"):
        build_plan(trt, model_file)
    # After the injected failures, everything works again.
    x = batch(3, seed=9)
    np.testing.assert_array_equal(rig.run(x), expected(reference, x))
    assert gpu_simulator.misuse == []


# Virtual time


def _overlap(a: TimelineEntry, b: TimelineEntry) -> bool:
    return a.start < b.end and b.start < a.end


def test_the_timeline_shows_overlap_only_when_dependencies_allow(gpu_simulator: GpuSimulator, plan: bytes) -> None:
    first, second = make_rig(gpu_simulator, plan), make_rig(gpu_simulator, plan)
    rt = gpu_simulator.cudart
    gpu_simulator.costs.execute_us = 500.0
    # Independent: the second context's copy and execute overlap the first's execute.
    for made in (first, second):
        made.pinned_in(MAX_BATCH)[:] = batch(MAX_BATCH, seed=1)
        made.enqueue(MAX_BATCH)
    ok(rt.cudaDeviceSynchronize())
    executes = [e for e in gpu_simulator.timeline if e.kind == "execute"]
    assert len(executes) == 2
    assert _overlap(*executes)
    # Dependent: the second waits for the first's completion event, so its work starts after.
    gpu_simulator.timeline.clear()
    first.enqueue(MAX_BATCH)
    ok(rt.cudaStreamWaitEvent(second.copy_stream, first.computed, 0))
    second.enqueue(MAX_BATCH)
    ok(rt.cudaEventSynchronize(second.computed))
    by_stream = {s: [e for e in gpu_simulator.timeline if e.stream == int(s)] for s in (
        first.compute_stream, second.copy_stream, second.compute_stream)}  # fmt: skip
    first_done = max(e.end for e in by_stream[first.compute_stream])
    assert min(e.start for e in by_stream[second.copy_stream]) >= first_done
    assert min(e.start for e in by_stream[second.compute_stream]) >= first_done
    first.close()
    second.close()


def test_host_synchronization_advances_host_time(rig: Rig) -> None:
    rig.run(batch(2, seed=1))
    end_of_first = max(e.end for e in rig.sim.timeline)
    rig.run(batch(2, seed=2))
    second_h2d = [e for e in rig.sim.timeline if e.kind == "h2d"][1]
    assert second_h2d.start >= end_of_first


# Graphs


def test_capture_and_launch_replays_the_captured_work(rig: Rig, reference: ort.InferenceSession) -> None:
    rt = rig.rt
    stream = rig.compute_stream
    size = 4
    rig.run(batch(size, seed=1))  # TensorRT needs one uncaptured enqueue for these shapes before capture
    ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
    ok(rt.cudaMemcpyAsync(rig.dev_in, rig.host_in, size * IN * 4, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    assert rig.context.execute_async_v3(int(stream))
    ok(rt.cudaMemcpyAsync(rig.host_out, rig.dev_out, size * OUT * 4, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    graph = ok(rt.cudaStreamEndCapture(stream))
    graph_exec = ok(rt.cudaGraphInstantiate(graph, 0))
    for seed in (2, 3):
        x = batch(size, seed=seed)
        rig.pinned_in(size)[:] = x
        ok(rt.cudaGraphLaunch(graph_exec, stream))
        ok(rt.cudaStreamSynchronize(stream))
        np.testing.assert_array_equal(rig.pinned_out(size), expected(reference, x))
    assert any(e.label.startswith("graph") and e.kind == "execute" for e in rig.sim.timeline)
    assert rig.sim.live()["graph_exec"] == 1
    ok(rt.cudaGraphExecDestroy(graph_exec))
    ok(rt.cudaGraphDestroy(graph))


def test_capturing_a_shape_never_enqueued_is_refused(rig: Rig) -> None:
    rt = rig.rt
    ok(rt.cudaStreamBeginCapture(rig.compute_stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
    assert rig.context.set_input_shape("x", (3, IN))
    assert rig.context.set_tensor_address("x", rig.dev_in)
    assert rig.context.set_tensor_address("y", rig.dev_out)
    assert rig.context.execute_async_v3(int(rig.compute_stream)) is False
    sync = rt.cudaStreamSynchronize(rig.compute_stream)
    assert sync == (rt.cudaError_t.cudaErrorStreamCaptureUnsupported,)
    ok(rt.cudaGraphDestroy(ok(rt.cudaStreamEndCapture(rig.compute_stream))))
    assert any("never enqueued before" in m for m in rig.sim.misuse)
    rig.sim.misuse.clear()


# Installation


def test_installed_puts_the_fakes_in_sys_modules_and_restores_them() -> None:
    sim = GpuSimulator(devices=2)
    before = {name: sys.modules.get(name) for name in ("tensorrt", "cuda.bindings.runtime")}
    with sim.installed():
        import tensorrt
        from cuda.bindings import runtime

        assert tensorrt is sim.tensorrt
        assert runtime is sim.cudart
        assert runtime.cudaGetDeviceCount() == (runtime.cudaError_t.cudaSuccess, 2)
        properties = ok(runtime.cudaGetDeviceProperties(1))
        assert (properties.name, properties.major, properties.minor) == (b"tensorgate simulated GPU", 8, 9)
    assert {name: sys.modules.get(name) for name in before} == before


def test_no_devices_reports_no_device() -> None:
    sim = GpuSimulator(devices=0)
    assert sim.cudart.cudaGetDeviceCount() == (sim.cudart.cudaError_t.cudaErrorNoDevice, None)


def test_a_graph_replayed_after_its_buffers_were_freed_fails_the_synchronization(gpu_simulator: GpuSimulator) -> None:
    rt = gpu_simulator.cudart
    stream = ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
    host, device = ok(rt.cudaHostAlloc(16, 0)), ok(rt.cudaMalloc(16))
    ok(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
    ok(rt.cudaMemcpyAsync(device, host, 16, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
    graph = ok(rt.cudaStreamEndCapture(stream))
    graph_exec = ok(rt.cudaGraphInstantiate(graph, 0))
    ok(rt.cudaFree(device))
    ok(rt.cudaGraphLaunch(graph_exec, stream))  # CUDA cannot tell at launch either
    assert rt.cudaStreamSynchronize(stream) == (rt.cudaError_t.cudaErrorLaunchFailure,)
    assert any("use after free" in m for m in gpu_simulator.misuse)
    gpu_simulator.misuse.clear()
    ok(rt.cudaGraphExecDestroy(graph_exec))
    ok(rt.cudaGraphDestroy(graph))
    ok(rt.cudaFreeHost(host))
    ok(rt.cudaStreamDestroy(stream))


def test_an_engine_runs_only_on_streams_and_memory_of_its_device(model_file: Path) -> None:
    sim = GpuSimulator(devices=2)
    trt, rt = sim.tensorrt, sim.cudart
    plan = build_plan(trt, model_file)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan)  # on device 0, the current one
    context = engine.create_execution_context()
    ok(rt.cudaSetDevice(1))
    other_stream = ok(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))
    other_in, other_out = ok(rt.cudaMalloc(IN * 4)), ok(rt.cudaMalloc(OUT * 4))
    assert context.set_input_shape("x", (1, IN))
    assert context.set_tensor_address("x", other_in)
    assert context.set_tensor_address("y", other_out)
    assert context.execute_async_v3(int(other_stream)) is False
    ok(rt.cudaSetDevice(0))
    assert context.execute_async_v3(0) is False  # device 0's stream, device 1's memory
    assert any("engine on device 0, stream on device 1" in m for m in sim.misuse)
    assert any("is on device 1, engine on 0" in m for m in sim.misuse)
    sim.misuse.clear()
    ok(rt.cudaSetDevice(1))
    ok(rt.cudaFree(other_in))
    ok(rt.cudaFree(other_out))
    ok(rt.cudaStreamDestroy(other_stream))
    sim.assert_clean()


def test_serialized_plans_offer_only_the_buffer_protocol(gpu_simulator: GpuSimulator, plan: bytes) -> None:
    trt = gpu_simulator.tensorrt
    serialized = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan).serialize()
    assert serialized.nbytes == len(plan)
    assert bytes(serialized) == plan
    assert memoryview(serialized).nbytes == len(plan)
    with pytest.raises(TypeError, match="nbytes"):
        len(serialized)
    assert serialized != plan  # TensorRT's IHostMemory is not bytes


# The fakes declare what the stubs declare


TYPINGS = Path(__file__).resolve().parents[2] / "typings"


def _stub_names(stub: Path) -> tuple[dict[str, list[str]], dict[str, dict[str, list[str] | None]], dict[str, Any]]:
    """Top-level functions (with parameter names), classes (members, with parameter names for methods), enums."""
    tree = ast.parse(stub.read_text())
    functions: dict[str, list[str]] = {}
    classes: dict[str, dict[str, list[str] | None]] = {}
    enums: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            functions[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            functions[node.target.id] = []
        elif isinstance(node, ast.ClassDef):
            members: dict[str, list[str] | None] = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and (item.name == "__init__" or not item.name.startswith("_")):
                    is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)
                    members[item.name] = None if is_property else [a.arg for a in item.args.args[1:]]
                elif isinstance(item, ast.ClassDef):
                    members[item.name] = None
            classes[node.name] = members
            if any(isinstance(b, ast.Attribute) and b.attr == "IntEnum" for b in node.bases):
                enums[node.name] = {
                    t.targets[0].id: ast.literal_eval(t.value)
                    for t in node.body
                    if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
                }
    return functions, classes, enums


@pytest.mark.parametrize(
    ("stub", "module"),
    [("tensorrt/__init__.pyi", "tensorrt"), ("cuda/bindings/runtime.pyi", "cudart")],
)
def test_the_fakes_declare_every_call_of_the_stubs(stub: str, module: str) -> None:
    fake = getattr(GpuSimulator(), module)
    functions, classes, enums = _stub_names(TYPINGS / stub)
    problems: list[str] = []
    for name, parameters in functions.items():
        if not hasattr(fake, name):
            problems.append(f"missing {name}")
        elif parameters and list(inspect.signature(getattr(fake, name)).parameters) != parameters:
            problems.append(f"{name}{tuple(inspect.signature(getattr(fake, name)).parameters)} != {parameters}")
    for cls, members in classes.items():
        found = getattr(fake, cls, None)
        if found is None:
            problems.append(f"missing class {cls}")
            continue
        for member, declared in members.items():
            if not hasattr(found, member):
                problems.append(f"missing {cls}.{member}")
            elif declared is not None:
                actual = list(inspect.signature(getattr(found, member)).parameters)[1:]
                if actual != declared:
                    problems.append(f"{cls}.{member}{tuple(actual)} != {declared}")
    for cls, values in enums.items():
        fake_values = {member.name: member.value for member in getattr(fake, cls)}
        if fake_values != values:
            problems.append(f"enum {cls}: {fake_values} != {values}")
    assert problems == []
