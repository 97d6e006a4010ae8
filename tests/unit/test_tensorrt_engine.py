"""The TensorRT engine on the CPU simulator (tests/support/gpu_simulator).

This verifies our orchestration of TensorRT and CUDA (stream order, events, buffer lifetimes, return codes,
profiles, threads), not TensorRT itself: the simulator computes with ONNX Runtime, so outputs are compared with
ONNX Runtime run in-process on the same ONNX model.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorgate.engines import (
    EngineError,
    EngineInputError,
    EngineSettings,
    EngineUnavailableError,
    create_engine,
    plans,
)
from tensorgate.engines.tensorrt import TensorRTEngine
from tests.support.gpu_simulator import GpuSimulator, TimelineEntry
from tests.support.gpu_simulator import tensorrt as sim_trt
from tests.support.gpu_simulator.trt_types import DataType, Dims
from tests.support.models import identity_model

MAX_BATCH = 8


def mlp_model(path: Path) -> Path:
    """y = relu(x @ w1 + b1) @ w2 over x [batch, 4] -> y [batch, 3] (IR 10, opset 17)."""
    rng = np.random.default_rng(7)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["h_biased"]),
            helper.make_node("Relu", ["h_biased"], ["h_relu"]),
            helper.make_node("MatMul", ["h_relu", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_plan(sim: GpuSimulator, onnx_file: Path, *, max_batch: int = MAX_BATCH) -> Path:
    """Build a plan for `onnx_file` with the simulator's builder (through plans.py) as model.plan beside it."""
    settings = plans.BuildSettings(opt_batch=min(4, max_batch), max_batch=max_batch)
    plan = plans.build_plan(sim.tensorrt, onnx_file, settings, timing_cache=None)
    target = onnx_file.with_name("model.plan")
    target.write_bytes(plan)
    return target


@pytest.fixture
def mlp_onnx(tmp_path: Path) -> Path:
    return mlp_model(tmp_path / "mlp" / "1" / "model.onnx")


@pytest.fixture
def mlp_plan(gpu_simulator: GpuSimulator, mlp_onnx: Path) -> Path:
    return write_plan(gpu_simulator, mlp_onnx)


@pytest.fixture
def reference(mlp_onnx: Path) -> Any:
    """y for x, from ONNX Runtime in-process."""
    session = ort.InferenceSession(str(mlp_onnx), providers=["CPUExecutionProvider"])

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        return np.asarray(session.run(["y"], {"x": x})[0])

    return run


@contextlib.asynccontextmanager
async def loaded(plan: Path, *, contexts: int = 1, **parameters: str) -> AsyncIterator[TensorRTEngine]:
    engine = TensorRTEngine(EngineSettings(plan, instance_count=contexts, parameters=parameters))
    await engine.load()
    try:
        yield engine
    finally:
        await engine.close()


def batch(rows: int, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)}


def overlaps(timeline: list[TimelineEntry]) -> list[tuple[TimelineEntry, TimelineEntry]]:
    """(h2d copy, execute) pairs that ran at the same (virtual) time on the same GPU."""
    copies = [e for e in timeline if e.kind == "h2d"]
    executes = [e for e in timeline if e.kind == "execute"]
    return [(c, e) for c in copies for e in executes if c.device == e.device and c.start < e.end and e.start < c.end]


# Results -------------------------------------------------------------------------------------------------------


async def test_outputs_equal_onnxruntime_for_every_batch_size(mlp_plan: Path, reference: Any) -> None:
    async with loaded(mlp_plan, contexts=2) as engine:
        await engine.warmup()
        for rows in range(1, MAX_BATCH + 1):
            for instance in range(engine.instance_count):
                x = batch(rows, seed=rows * 10 + instance)
                result = await engine.infer(x, instance=instance)
                assert set(result) == {"y"}
                np.testing.assert_allclose(result["y"], reference(x["x"]), rtol=1e-6)


async def test_specs_come_from_the_plan_and_its_profile(mlp_plan: Path, gpu_simulator: GpuSimulator) -> None:
    async with loaded(mlp_plan, contexts=2, pipeline_depth="3") as engine:
        (spec,) = engine.inputs
        assert (spec.name, spec.dtype, spec.shape) == ("x", np.dtype(np.float32), (-1, 4))
        assert (spec.min_shape, spec.max_shape) == ((1, 4), (MAX_BATCH, 4))
        (out,) = engine.outputs
        assert (out.name, out.dtype, out.shape) == ("y", np.dtype(np.float32), (-1, 3))
        assert engine.instance_count == 6
        assert engine.description == (
            f"tensorrt {gpu_simulator.trt_version} (tensorgate simulated GPU, sm_89; 2 contexts x depth 3, "
            "cuda graphs off)"
        )


# The simulator's dtypes that TensorRT carries as I/O (ONNX Runtime's numpy binding has no bfloat16).
IDENTITY_TYPES = {
    "FP32": (TensorProto.FLOAT, np.float32),
    "FP16": (TensorProto.FLOAT16, np.float16),
    "INT8": (TensorProto.INT8, np.int8),
    "UINT8": (TensorProto.UINT8, np.uint8),
    "INT32": (TensorProto.INT32, np.int32),
    "INT64": (TensorProto.INT64, np.int64),
    "BOOL": (TensorProto.BOOL, np.bool_),
}


@pytest.mark.parametrize("name", sorted(IDENTITY_TYPES))
async def test_identity_round_trips_each_dtype(tmp_path: Path, gpu_simulator: GpuSimulator, name: str) -> None:
    onnx_type, dtype = IDENTITY_TYPES[name]
    plan = write_plan(gpu_simulator, identity_model(tmp_path / "id" / "1" / "model.onnx", onnx_type))
    async with loaded(plan) as engine:
        assert engine.inputs[0].dtype == np.dtype(dtype)
        assert engine.outputs[0].dtype == np.dtype(dtype)
        for rows in range(1, MAX_BATCH + 1):
            value: npt.NDArray[Any] = (np.arange(rows * 2) % 7).astype(dtype).reshape(rows, 2)
            result = (await engine.infer({"x": value}, instance=rows % 2))["y"]
            assert result.dtype == value.dtype
            np.testing.assert_array_equal(result, value)


async def test_only_the_outputs_asked_for_are_copied_back(tmp_path: Path, gpu_simulator: GpuSimulator) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx_file = tmp_path / "two" / "1" / "model.onnx"
    onnx_file.parent.mkdir(parents=True)
    onnx.save(model, onnx_file)
    async with loaded(write_plan(gpu_simulator, onnx_file)) as engine:
        x = np.arange(6, dtype=np.float32).reshape(3, 2)
        before = len(gpu_simulator.timeline)
        result = await engine.infer({"x": x}, outputs=["b"])
        assert set(result) == {"b"}
        np.testing.assert_array_equal(result["b"], -x)
        assert [e.kind for e in gpu_simulator.timeline[before:]].count("d2h") == 1
        with pytest.raises(EngineInputError, match="unknown output 'c'"):
            await engine.infer({"x": x}, outputs=["c"])


# Concurrency and overlap -----------------------------------------------------------------------------------------


async def test_concurrent_batches_on_every_instance(
    mlp_plan: Path, reference: Any, gpu_simulator: GpuSimulator
) -> None:
    async with loaded(mlp_plan, contexts=2, pipeline_depth="2") as engine:
        assert engine.instance_count == 4
        for round_ in range(3):
            inputs = [batch(1 + (round_ + i) % MAX_BATCH, seed=round_ * 4 + i) for i in range(4)]
            results = await asyncio.gather(*(engine.infer(x, instance=i) for i, x in enumerate(inputs)))
            for x, result in zip(inputs, results, strict=True):
                np.testing.assert_allclose(result["y"], reference(x["x"]), rtol=1e-6)
    compute_streams = {e.stream for e in gpu_simulator.timeline if e.kind == "execute"}
    assert len(compute_streams) == 2  # one per execution context


async def test_copies_overlap_compute_with_depth_2(mlp_plan: Path, gpu_simulator: GpuSimulator) -> None:
    async with loaded(mlp_plan, pipeline_depth="2") as engine:
        await asyncio.gather(engine.infer(batch(8, 1), instance=0), engine.infer(batch(8, 2), instance=1))
    assert overlaps(gpu_simulator.timeline), gpu_simulator.timeline


async def test_copies_do_not_overlap_compute_with_depth_1(mlp_plan: Path, gpu_simulator: GpuSimulator) -> None:
    async with loaded(mlp_plan, pipeline_depth="1") as engine:
        assert engine.instance_count == 1
        for seed in range(3):
            await engine.infer(batch(8, seed), instance=0)
    assert len([e for e in gpu_simulator.timeline if e.kind == "execute"]) == 3
    assert not overlaps(gpu_simulator.timeline)


async def test_contexts_on_their_own_gpus(tmp_path: Path, reference: Any, mlp_onnx: Path) -> None:
    simulator = GpuSimulator(devices=2)
    with simulator.installed():
        plan = write_plan(simulator, mlp_onnx)
        engine = TensorRTEngine(EngineSettings(plan, instance_count=2, devices=(1, 0)))
        await engine.load()
        try:
            x = batch(5)
            results = await asyncio.gather(*(engine.infer(x, instance=i) for i in range(4)))
        finally:
            await engine.close()
    for result in results:
        np.testing.assert_allclose(result["y"], reference(x["x"]), rtol=1e-6)
    assert {e.device for e in simulator.timeline if e.kind == "execute"} == {0, 1}
    simulator.assert_clean()


# CUDA graphs -------------------------------------------------------------------------------------------------------


async def test_cuda_graphs_give_the_same_numbers_and_are_launched(
    mlp_plan: Path, reference: Any, gpu_simulator: GpuSimulator
) -> None:
    async with loaded(mlp_plan, pipeline_depth="1", cuda_graphs="true") as engine:
        assert engine.description.endswith("cuda graphs on)")
        context = engine._contexts[0].context
        assert context is not None
        calls: list[int] = []
        original = context.execute_async_v3

        def counting(stream: int) -> bool:
            calls.append(stream)
            return bool(original(stream))

        context.execute_async_v3 = counting  # type: ignore[method-assign,assignment]
        sizes = [3, 3, 3, 5, 5, 3]
        for index, rows in enumerate(sizes):
            x = batch(rows, seed=index)
            np.testing.assert_allclose((await engine.infer(x))["y"], reference(x["x"]), rtol=1e-6)
        # Per batch size: one normal run, one captured run; every later batch of that size is a graph launch.
        assert len(calls) == 4
        assert gpu_simulator.live()["graph_exec"] == 2
    executes = [e for e in gpu_simulator.timeline if e.kind == "execute"]
    assert [e.label.startswith("graph ") for e in executes] == [False, True, True, False, True, True]


# Errors ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "cudaMalloc",
        "cudaHostAlloc",
        "cudaStreamCreateWithFlags",
        "cudaEventCreateWithFlags",
        "create_execution_context",
        "deserialize_cuda_engine",
    ],
)
async def test_a_failure_at_load_names_the_call_and_leaks_nothing(
    mlp_plan: Path, gpu_simulator: GpuSimulator, call: str
) -> None:
    gpu_simulator.fail_next(call)
    engine = TensorRTEngine(EngineSettings(mlp_plan, instance_count=2))
    with pytest.raises(EngineError, match=call) as raised:
        await engine.load()
    # A rejected plan is a reason to fall back to ONNX Runtime; a CUDA or context failure is a broken load.
    assert isinstance(raised.value, EngineUnavailableError) == (call == "deserialize_cuda_engine")
    del raised  # its traceback's frames still reference the engine TensorRT deserialized
    assert not any(gpu_simulator.live().values()), gpu_simulator.live()
    await engine.close()  # still safe


@pytest.mark.parametrize(
    "call",
    [
        "execute_async_v3",
        "cudaMemcpyAsync",
        "cudaEventRecord",
        "cudaStreamWaitEvent",
        "set_input_shape",
        "set_tensor_address",
        "cudaEventSynchronize",
    ],
)
async def test_a_failing_call_fails_that_batch_and_the_next_one_succeeds(
    mlp_plan: Path, reference: Any, gpu_simulator: GpuSimulator, call: str
) -> None:
    async with loaded(mlp_plan) as engine:
        gpu_simulator.fail_next(call)
        with pytest.raises(EngineError, match=call):
            await engine.infer(batch(4), instance=0)
        for instance in (0, 1, 0):
            x = batch(6, seed=instance)
            np.testing.assert_allclose((await engine.infer(x, instance=instance))["y"], reference(x["x"]), rtol=1e-6)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((MAX_BATCH + 1, 4), np.float32), r"shape \[9, 4\], outside .* profile: \[1, 4\] to \[8, 4\]"),
        (np.zeros((2, 5), np.float32), r"shape \[2, 5\]"),
        (np.zeros((2, 4, 1), np.float32), r"shape \[2, 4, 1\]"),
        (np.zeros((2, 4), np.float64), "dtype float64"),
    ],
)
async def test_inputs_outside_the_profile_are_refused_before_anything_is_queued(
    mlp_plan: Path, reference: Any, gpu_simulator: GpuSimulator, x: npt.NDArray[Any], message: str
) -> None:
    async with loaded(mlp_plan) as engine:
        before = len(gpu_simulator.timeline)
        with pytest.raises(EngineInputError, match=message):
            await engine.infer({"x": x})
        with pytest.raises(EngineInputError, match="missing input 'x'"):
            await engine.infer({})
        with pytest.raises(EngineInputError, match="unknown input 'z'"):
            await engine.infer({**batch(2), "z": x})
        good = batch(2)
        np.testing.assert_allclose((await engine.infer(good))["y"], reference(good["x"]), rtol=1e-6)
        # Only the good batch ran: nothing the refused ones might have queued ran with it.
        assert sorted(e.kind for e in gpu_simulator.timeline[before:]) == ["d2h", "execute", "h2d"]


async def test_unsupported_parameters_are_named(mlp_plan: Path) -> None:
    with pytest.raises(EngineError, match="pipeline_depth"):
        TensorRTEngine(EngineSettings(mlp_plan, parameters={"pipeline_depth": "0"}))
    with pytest.raises(EngineError, match="cuda_graphs"):
        TensorRTEngine(EngineSettings(mlp_plan, parameters={"cuda_graphs": "maybe"}))
    with pytest.raises(EngineError, match="plan_build"):
        TensorRTEngine(EngineSettings(mlp_plan, parameters={"plan_build": "always"}))
    with pytest.raises(EngineError, match="one per instance"):
        TensorRTEngine(EngineSettings(mlp_plan, instance_count=2, devices=(0,)))


async def test_a_gpu_that_does_not_exist_is_named(mlp_plan: Path, gpu_simulator: GpuSimulator) -> None:
    engine = TensorRTEngine(EngineSettings(mlp_plan, devices=(3,)))
    with pytest.raises(EngineError, match="GPU 3"):
        await engine.load()


# Plans -------------------------------------------------------------------------------------------------------------


async def test_a_plan_from_another_tensorrt_is_refused_with_the_reason(
    mlp_plan: Path, gpu_simulator: GpuSimulator
) -> None:
    gpu_simulator.trt_version = "11.0.0-sim"
    engine = TensorRTEngine(EngineSettings(mlp_plan))
    with pytest.raises(EngineError, match="deserialize_cuda_engine returned None") as raised:
        await engine.load()
    assert "version" in str(raised.value)  # TensorRT's own reason, from its log


async def test_plan_build_on_load_builds_and_caches_a_missing_or_rejected_plan(
    tmp_path: Path, mlp_onnx: Path, reference: Any, gpu_simulator: GpuSimulator
) -> None:
    cache = tmp_path / "cache"
    settings = EngineSettings(
        mlp_onnx.with_name("model.plan"),
        parameters={"plan_build": "on_load"},
        max_batch_size=4,
        plan_cache_dir=cache,
    )
    engine = TensorRTEngine(settings)
    await engine.load()
    try:
        assert engine.inputs[0].max_shape == (4, 4)
        x = batch(4)
        np.testing.assert_allclose((await engine.infer(x))["y"], reference(x["x"]), rtol=1e-6)
    finally:
        await engine.close()
    assert len(list(cache.glob("*.plan"))) == 1
    # A model.plan TensorRT rejects is rebuilt from model.onnx too.
    mlp_onnx.with_name("model.plan").write_bytes(b"not a plan")
    engine = TensorRTEngine(settings)
    await engine.load()
    await engine.close()


async def test_without_plan_build_a_missing_plan_says_how_to_get_one(
    mlp_onnx: Path, gpu_simulator: GpuSimulator
) -> None:
    engine = TensorRTEngine(EngineSettings(mlp_onnx.with_name("model.plan")))
    with pytest.raises(EngineError, match=r"no such plan file.*build-engine"):
        await engine.load()


# Availability and lifetime ----------------------------------------------------------------------------------------


async def test_without_tensorrt_the_engine_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules: `import tensorrt` fails
    engine = create_engine("tensorrt_plan", EngineSettings(tmp_path / "model.plan"))
    with pytest.raises(EngineUnavailableError, match="TensorRT cannot run here"):
        await engine.load()


async def test_without_a_gpu_the_engine_is_unavailable(mlp_onnx: Path) -> None:
    simulator = GpuSimulator(devices=0)
    with simulator.installed():
        engine = TensorRTEngine(EngineSettings(mlp_onnx.with_name("model.plan")))
        with pytest.raises(EngineUnavailableError, match="no GPU"):
            await engine.load()
    simulator.assert_clean()


async def test_close_frees_everything_and_is_idempotent(mlp_plan: Path, gpu_simulator: GpuSimulator) -> None:
    engine = TensorRTEngine(EngineSettings(mlp_plan, instance_count=2, parameters={"pipeline_depth": "3"}))
    await engine.load()
    await engine.warmup()
    live = gpu_simulator.live()
    # 2 contexts x 3 slots, each with its input and output pinned and on the device, and 3 events; per context
    # 3 streams; one engine (one GPU).
    assert (live["device"], live["host"], live["event"], live["stream"]) == (12, 12, 18, 6)
    assert (live["engine"], live["context"]) == (1, 2)
    await engine.close()
    assert not any(gpu_simulator.live().values()), gpu_simulator.live()
    gpu_simulator.assert_clean()
    await engine.close()
    with pytest.raises(EngineError, match="not loaded"):
        await engine.infer(batch(1))
    assert engine.description == "tensorrt (not loaded)"


async def test_close_frees_captured_graphs(mlp_plan: Path, gpu_simulator: GpuSimulator) -> None:
    async with loaded(mlp_plan, contexts=2, cuda_graphs="true") as engine:
        await engine.warmup()
        await engine.warmup()
        assert gpu_simulator.live()["graph_exec"] == engine.instance_count
    live = gpu_simulator.live()
    assert live["context"] == live["engine"] == 0  # graph nodes must not keep the contexts alive
    assert all(count == 0 for count in live.values()), live


async def test_a_data_dependent_output_shape_is_refused_at_load(
    mlp_plan: Path, gpu_simulator: GpuSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = sim_trt.IExecutionContext.get_tensor_shape

    def unknown_rows(self: sim_trt.IExecutionContext, name: str) -> Dims:
        # What TensorRT reports for an output whose size depends on the data (e.g. NonZero): -1 even with every
        # input shape set.
        return Dims((-1, 3)) if name == "y" else original(self, name)

    monkeypatch.setattr(sim_trt.IExecutionContext, "get_tensor_shape", unknown_rows)
    engine = TensorRTEngine(EngineSettings(mlp_plan))
    with pytest.raises(EngineError, match=r"output 'y' has a data-dependent shape \[-1, 3\]"):
        await engine.load()


@pytest.mark.parametrize("dtype", ["FP8", "INT4"])
async def test_a_tensor_of_a_type_numpy_cannot_carry_is_named(
    mlp_plan: Path, gpu_simulator: GpuSimulator, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    original = sim_trt.ICudaEngine.get_tensor_dtype

    def narrow(self: sim_trt.ICudaEngine, name: str) -> DataType:
        return DataType[dtype] if name == "y" else original(self, name)

    monkeypatch.setattr(sim_trt.ICudaEngine, "get_tensor_dtype", narrow)
    engine = TensorRTEngine(EngineSettings(mlp_plan))
    with pytest.raises(EngineError, match=f"tensor 'y' is {dtype}, which tensorgate cannot carry"):
        await engine.load()
