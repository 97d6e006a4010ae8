"""TensorRT on a real NVIDIA GPU: plans built by `tensorgate build-engine`, served by the real server, checked
against ONNX Runtime; then copy/compute overlap and throughput, printed and written to bench/results/gpu.md.

Tests assert correctness only. Timings are figures to read (pytest -s shows them), never assertions: the same GPU
gives different numbers under other load, clocks and drivers. Run with `make test-gpu`.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from bench.models import build_resnet18
from tensorgate.client import AsyncClient, Client
from tensorgate.engines.base import EngineSettings
from tensorgate.engines.cuda import CudaRuntime
from tensorgate.engines.plans import PlanCache
from tensorgate.engines.tensorrt import TensorRTEngine
from tensorgate.server import build_engine
from tests.support.serving import EXAMPLE_MODELS, running_server

if TYPE_CHECKING:
    import tensorrt

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "gpu.md"
DIGITS_ONNX = EXAMPLE_MODELS / "digits" / "1" / "model.onnx"
RESNET_BATCH = 32

DIGITS_CONFIG = """
name: "digits"
platform: "tensorrt_plan"
max_batch_size: 64
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] } ]
output [
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] },
  { name: "label" data_type: TYPE_INT64 dims: [ ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]
parameters [
  { key: "pipeline_depth" value: { string_value: "2" } },
  # A GPU test must fail, not pass on ONNX Runtime, when TensorRT cannot serve the model.
  { key: "fallback" value: { string_value: "none" } }%s
]
"""

RESNET_CONFIG = f"""
name: "resnet18"
platform: "tensorrt_plan"
max_batch_size: {RESNET_BATCH}
input [ {{ name: "input" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] }} ]
output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ 1000 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [ {{ count: 1 kind: KIND_GPU gpus: [ 0 ] }} ]
parameters [
  {{ key: "pipeline_depth" value: {{ string_value: "2" }} }},
  {{ key: "fallback" value: {{ string_value: "none" }} }}
]
"""


@dataclass
class Gpu:
    """The real libraries and the GPU the suite runs on."""

    trt: ModuleType
    cuda: CudaRuntime
    name: str
    capability: tuple[int, int]


@dataclass
class Figures:
    """What the suite measured, written to bench/results/gpu.md at the end of the module."""

    gpu: str = ""
    rows: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, what: str, value: str, note: str = "") -> None:
        print(f"{what}: {value} {note}")
        self.rows.append((what, value, note))


@pytest.fixture(scope="module")
def gpu() -> Gpu:
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    cuda = CudaRuntime(cudart)
    cuda.set_device(0)
    return Gpu(trt, cuda, cuda.device_name(0), cuda.compute_capability(0))


@pytest.fixture(scope="module")
def figures(gpu: Gpu) -> Iterator[Figures]:
    found = Figures(
        f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}), TensorRT {gpu.trt.__version__}"
    )
    yield found
    lines = [
        "# TensorRT on a GPU (tests/gpu, `make test-gpu`)",
        "",
        f"Device: {found.gpu}. One run; figures vary with load, clocks and drivers. Tests never assert them.",
        "",
        "| measurement | value | note |",
        "| --- | --- | --- |",
        *(f"| {what} | {value} | {note} |" for what, value, note in found.rows),
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


def _build(onnx_file: Path, cache: Path, *arguments: str) -> None:
    """Run `tensorgate build-engine` in-process."""
    status = build_engine.main([str(onnx_file), "--cache-dir", str(cache), *arguments])
    assert status == 0, f"build-engine exited {status}"


def _session(onnx_file: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])


# Digits: build, serve, compare ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_repository(gpu: Gpu, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("repository")
    version = repository / "digits" / "1"
    version.mkdir(parents=True)
    onnx_file = Path(shutil.copy(DIGITS_ONNX, version / "model.onnx"))
    cache = tmp_path_factory.mktemp("plans")
    _build(onnx_file, cache, "--max-batch", "64")
    assert (version / "model.plan").is_file()
    (repository / "digits" / "config.pbtxt").write_text(DIGITS_CONFIG % "")
    return repository


def test_build_engine_builds_once_then_serves_from_the_cache(
    gpu: Gpu, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_file = Path(shutil.copy(DIGITS_ONNX, tmp_path / "model.onnx"))
    cache = tmp_path / "plans"
    assert build_engine.main([str(onnx_file), "--cache-dir", str(cache), "--max-batch", "16"]) == 0
    first = capsys.readouterr().out
    assert "built in" in first
    assert gpu.name in first
    assert build_engine.main([str(onnx_file), "--cache-dir", str(cache), "--max-batch", "16"]) == 0
    assert "from the plan cache" in capsys.readouterr().out
    assert len(list(cache.glob("*.plan"))) == 1
    assert any(cache.glob("timing-*.cache"))
    runtime = gpu.trt.Runtime(gpu.trt.Logger(gpu.trt.Logger.WARNING))
    engine: tensorrt.ICudaEngine | None = runtime.deserialize_cuda_engine(onnx_file.with_suffix(".plan").read_bytes())
    assert engine is not None
    assert [tuple(shape) for shape in engine.get_tensor_profile_shape("image", 0)] == [
        (1, 1, 8, 8),
        (8, 1, 8, 8),
        (16, 1, 8, 8),
    ]


def _check_digits(got: Mapping[str, npt.NDArray[Any]], session: ort.InferenceSession, images: Any) -> None:
    probabilities, labels = session.run(["probabilities", "label"], {"image": images})
    # TensorRT may run FP32 matrix products in TF32 on Ampere and later: close, not bit-equal.
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=2e-3, atol=2e-4)
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2  # labels of near-ties may flip with rounding
    np.testing.assert_array_equal(got["label"][clear], labels[clear])


def test_the_served_plan_matches_onnxruntime(digits_repository: Path) -> None:
    session = _session(DIGITS_ONNX)
    rng = np.random.default_rng(3)
    with running_server(digits_repository) as server, Client(server.address, timeout=60) as client:
        meta = client.metadata("digits")
        assert meta.platform == "tensorrt_plan"
        assert meta.engine.startswith("tensorrt "), meta.engine  # served by TensorRT, not a fallback
        for batch in (1, 2, 7, 33, 64):
            images = rng.uniform(0, 16, size=(batch, 1, 8, 8)).astype(np.float32)
            _check_digits(client.predict("digits", {"image": images}), session, images)

        # Many callers at once: the batcher forms batches of mixed sizes, the engine keeps two in flight.
        def call(seed: int) -> None:
            images = np.random.default_rng(seed).uniform(0, 16, size=(1 + seed % 5, 1, 8, 8)).astype(np.float32)
            _check_digits(client.predict("digits", {"image": images}), session, images)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(call, range(256)))


def test_a_plan_built_at_load_from_onnx(gpu: Gpu, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    (repository / "digits" / "1").mkdir(parents=True)
    shutil.copy(DIGITS_ONNX, repository / "digits" / "1" / "model.onnx")
    on_load = ',\n  { key: "plan_build" value: { string_value: "on_load" } }'
    (repository / "digits" / "config.pbtxt").write_text(DIGITS_CONFIG % on_load)
    cache = tmp_path / "plans"
    session = _session(DIGITS_ONNX)
    images = np.random.default_rng(5).uniform(0, 16, size=(9, 1, 8, 8)).astype(np.float32)
    with running_server(repository, plan_cache=str(cache)) as server, Client(server.address, timeout=60) as client:
        assert client.metadata("digits").engine.startswith("tensorrt ")
        _check_digits(client.predict("digits", {"image": images}), session, images)
    assert len(list(PlanCache(cache).root.glob("*.plan"))) == 1


# ResNet-18: overlap and throughput ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet(gpu: Gpu, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18-shaped model (random weights) and its plan, in a servable repository."""
    repository = tmp_path_factory.mktemp("resnet")
    version = repository / "resnet18" / "1"
    build_resnet18(version / "model.onnx")
    _build(
        version / "model.onnx",
        tmp_path_factory.mktemp("plans"),
        "--max-batch",
        str(RESNET_BATCH),
        "--opt-batch",
        str(RESNET_BATCH),
    )
    (repository / "resnet18" / "config.pbtxt").write_text(RESNET_CONFIG)
    return version / "model.plan"


def _images(batch: int, seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((batch, 3, 224, 224), dtype=np.float32)


def _stage_times(gpu: Gpu, plan: Path, iterations: int = 50) -> dict[str, float]:
    """trtexec-style, in-process: seconds per batch of each stage alone (H2D, compute, D2H), and of the three
    back to back on one stream, with no server, batcher or Python work per batch in the way."""
    trt, cuda = gpu.trt, gpu.cuda
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine: tensorrt.ICudaEngine | None = runtime.deserialize_cuda_engine(plan.read_bytes())
    assert engine is not None
    context = engine.create_execution_context()
    assert context is not None
    in_bytes = RESNET_BATCH * 3 * 224 * 224 * 4
    out_bytes = RESNET_BATCH * 1000 * 4
    stream = cuda.stream()
    host_in, host_out = cuda.pinned(in_bytes), cuda.pinned(out_bytes)
    device_in, device_out = cuda.device_buffer(in_bytes), cuda.device_buffer(out_bytes)
    try:
        host_in.view(np.dtype(np.float32), (RESNET_BATCH, 3, 224, 224))[...] = _images(RESNET_BATCH)
        assert context.set_input_shape("input", (RESNET_BATCH, 3, 224, 224))
        assert context.set_tensor_address("input", device_in.pointer)
        assert context.set_tensor_address("logits", device_out.pointer)

        def h2d() -> None:
            stream.copy_to_device(device_in, host_in, in_bytes)

        def compute() -> None:
            assert context.execute_async_v3(int(stream.handle))

        def d2h() -> None:
            stream.copy_to_host(host_out, device_out, out_bytes)

        def timed(*stages: Any) -> float:
            for stage in stages:  # warm
                stage()
            stream.synchronize()
            started = time.perf_counter()
            for _ in range(iterations):
                for stage in stages:
                    stage()
            stream.synchronize()
            return (time.perf_counter() - started) / iterations

        return {
            "h2d": timed(h2d),
            "compute": timed(compute),
            "d2h": timed(d2h),
            "serial": timed(h2d, compute, d2h),
        }
    finally:
        for item in (device_out, device_in, host_out, host_in, stream):
            item.close()


async def _engine_run(plan: Path, depth: int, batches: int) -> tuple[float, npt.NDArray[Any]]:
    """Seconds for `batches` batches through TensorRTEngine at `depth` batches in flight, and one batch's output."""
    engine = TensorRTEngine(
        EngineSettings(model_file=plan, instance_count=1, parameters={"pipeline_depth": str(depth)}, devices=(0,))
    )
    await engine.load()
    try:
        await engine.warmup()
        images = _images(RESNET_BATCH, seed=1)

        async def worker(instance: int) -> None:
            for _ in range(batches // engine.instance_count):
                await engine.infer({"input": images}, instance=instance)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(engine.instance_count)))
        elapsed = time.perf_counter() - started
        sample = (await engine.infer({"input": images[:4]}, instance=0))["logits"]
    finally:
        await engine.close()
    return elapsed / (batches // engine.instance_count * engine.instance_count), sample


def _check_resnet(logits: npt.NDArray[Any], images: npt.NDArray[np.float32], onnx_file: Path) -> None:
    (expected,) = _session(onnx_file).run(["logits"], {"input": images})
    # TF32 through 18 layers: compare relative to the logits' scale.
    scale = float(np.abs(expected).max())
    assert float(np.abs(logits - expected).max()) <= 2e-2 * scale + 1e-3


@pytest.mark.timeout(1200)  # building the plan takes minutes
async def test_pipelined_engine_is_right_at_depth_1_and_2_and_reports_the_overlap(
    gpu: Gpu, resnet: Path, figures: Figures
) -> None:
    stages = _stage_times(gpu, resnet)
    per_depth = {}
    for depth in (1, 2):
        seconds, sample = await _engine_run(resnet, depth, batches=64)
        _check_resnet(sample, _images(RESNET_BATCH, seed=1)[:4], resnet.with_suffix(".onnx"))
        per_depth[depth] = seconds
    ms = {name: value * 1e3 for name, value in stages.items()}
    figures.add("ResNet-18 batch", str(RESNET_BATCH), "FP32 input 3x224x224")
    figures.add("H2D per batch", f"{ms['h2d']:.2f} ms", "pinned host memory")
    figures.add("compute per batch", f"{ms['compute']:.2f} ms", "execute_async_v3 alone")
    figures.add("D2H per batch", f"{ms['d2h']:.2f} ms", "")
    figures.add("H2D+compute+D2H, one stream", f"{ms['serial']:.2f} ms", "trtexec-style, no overlap possible")
    figures.add("engine, depth 1", f"{per_depth[1] * 1e3:.2f} ms/batch", "one batch in flight")
    figures.add("engine, depth 2", f"{per_depth[2] * 1e3:.2f} ms/batch", "copies of one batch overlap compute")
    figures.add("depth 2 speed-up over depth 1", f"{per_depth[1] / per_depth[2]:.2f}x", "")
    bound = max(ms["h2d"], ms["compute"], ms["d2h"])
    figures.add("best possible with full overlap", f"{bound:.2f} ms/batch", "the slowest stage")
    # The check is the numbers at both depths (above); the timings are figures, never asserted (bench/results/gpu.md).
    assert figures.rows


@pytest.mark.timeout(1200)
async def test_served_plan_matches_onnxruntime_and_reports_throughput(gpu: Gpu, resnet: Path, figures: Figures) -> None:
    stages = _stage_times(gpu, resnet)
    in_process = RESNET_BATCH / stages["serial"]
    repository = resnet.parent.parent.parent
    requests, concurrency = 1024, 64
    image = _images(1, seed=2)
    with running_server(repository) as server:
        async with AsyncClient(server.address, timeout=120) as client:
            meta = await client.metadata("resnet18")
            assert meta.engine.startswith("tensorrt "), meta.engine
            first = await client.predict("resnet18", {"input": image})
            _check_resnet(first["logits"], image, resnet.with_suffix(".onnx"))
            semaphore = asyncio.Semaphore(concurrency)

            async def call() -> None:
                async with semaphore:
                    result = await client.predict("resnet18", {"input": image})
                    assert result["logits"].shape == (1, 1000)

            started = time.perf_counter()
            await asyncio.gather(*(call() for _ in range(requests)))
            served = requests / (time.perf_counter() - started)
    figures.add("in-process, trtexec-style", f"{in_process:.0f} images/s", f"batch {RESNET_BATCH}, with copies")
    figures.add("served, batch-1 requests", f"{served:.0f} images/s", f"{concurrency} concurrent gRPC calls")
    figures.add("served / in-process", f"{served / in_process:.2f}", "")
