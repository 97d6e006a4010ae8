"""The plan builder and plan cache, on the CPU simulator of TensorRT (tests/support/gpu_simulator).

The simulator's builder parses with ONNX, records the optimization profile and serializes a plan that its runtime
rejects under another TensorRT version or GPU, as the real one does. This checks our use of the builder API and
the cache's logic, not TensorRT itself (tests/gpu does that on a real GPU).
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from tensorgate.engines.base import EngineError
from tensorgate.engines.plans import (
    PLAN_CACHE_ENV,
    BuildSettings,
    PlanCache,
    ShapeRange,
    build_plan,
    build_settings_from_parameters,
    load_or_build,
    load_or_build_plan,
    parse_shape_range,
    write_atomically,
)
from tests.support.gpu_simulator import GpuSimulator
from tests.support.models import identity_model

SETTINGS = BuildSettings(min_batch=1, opt_batch=2, max_batch=4, workspace_bytes=1 << 26)
DEVICE = "tensorgate simulated GPU"
CAPABILITY = (8, 9)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """y = x over FP32 [batch, 2]."""
    return identity_model(tmp_path / "models" / "model.onnx", TensorProto.FLOAT)


def _sequence_model(path: Path) -> Path:
    """y = x over FP32 [batch, seq, 4], plus a fixed-shape input m [3]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["m"], ["n"])],
        "sequence",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4]),
            helper.make_tensor_value_info("n", TensorProto.FLOAT, [3]),
        ],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, path)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> PlanCache:
    return PlanCache(tmp_path / "plans")


@pytest.fixture
def builds(gpu_simulator: GpuSimulator, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts build_serialized_network calls (a spy around the simulator's builder)."""
    calls: list[str] = []
    builder_class = gpu_simulator.tensorrt.Builder
    original: Callable[..., Any] = builder_class.build_serialized_network

    def spy(self: Any, network: Any, config: Any) -> Any:
        calls.append("build")
        return original(self, network, config)

    monkeypatch.setattr(builder_class, "build_serialized_network", spy)
    return calls


def _runtime(sim: GpuSimulator) -> Any:
    trt = sim.tensorrt
    return trt.Runtime(trt.Logger(trt.Logger.WARNING))


def _load(sim: GpuSimulator, model: Path, cache: PlanCache, settings: BuildSettings = SETTINGS) -> Any:
    return load_or_build_plan(
        sim.tensorrt, _runtime(sim), model, settings, cache, device_name=DEVICE, compute_capability=CAPABILITY
    )


def _stray_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith(".") or path.suffix == ".tmp"]


# Building -----------------------------------------------------------------------------------------------------


def test_a_built_plan_deserializes_with_the_profile_of_the_settings(
    gpu_simulator: GpuSimulator, model: Path, tmp_path: Path
) -> None:
    trt = gpu_simulator.tensorrt
    plan = build_plan(trt, model, SETTINGS, timing_cache=tmp_path / "timing.cache")
    engine = _runtime(gpu_simulator).deserialize_cuda_engine(plan)
    assert engine is not None
    assert engine.num_optimization_profiles == 1
    low, opt, high = (tuple(shape) for shape in engine.get_tensor_profile_shape("x", 0))
    assert (low, opt, high) == ((1, 2), (2, 2), (4, 2))
    del engine


def test_inputs_with_other_dynamic_dimensions_need_their_shapes(gpu_simulator: GpuSimulator, tmp_path: Path) -> None:
    model = _sequence_model(tmp_path / "sequence.onnx")
    with pytest.raises(EngineError) as caught:
        build_plan(gpu_simulator.tensorrt, model, SETTINGS, timing_cache=None)
    message = str(caught.value)
    assert str(model) in message
    assert "input 'x'" in message
    assert "dynamic dimension 1" in message
    assert "'m'" not in message  # fixed shapes need nothing

    settings = BuildSettings(max_batch=4, opt_batch=2, shapes={"x": ((1, 1, 4), (2, 16, 4), (4, 64, 4))})
    plan = build_plan(gpu_simulator.tensorrt, model, settings, timing_cache=None)
    engine = _runtime(gpu_simulator).deserialize_cuda_engine(plan)
    assert engine is not None
    assert [tuple(s) for s in engine.get_tensor_profile_shape("x", 0)] == [(1, 1, 4), (2, 16, 4), (4, 64, 4)]
    assert [tuple(s) for s in engine.get_tensor_profile_shape("m", 0)] == [(3,), (3,), (3,)]
    del engine


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({"x": ((1, 1), (2, 2), (4, 4))}, "has 3 dimensions"),
        ({"x": ((1, 1, 3), (2, 2, 3), (4, 4, 3))}, "fixed dimension 2 = 4"),
        ({"nope": ((1,), (1,), (1,))}, "'nope', which"),
    ],
    ids=["rank", "fixed-dimension", "unknown-input"],
)
def test_given_shapes_must_fit_the_network(
    gpu_simulator: GpuSimulator, tmp_path: Path, shapes: dict[str, Any], expected: str
) -> None:
    model = _sequence_model(tmp_path / "sequence.onnx")
    with pytest.raises(EngineError, match=expected):
        build_plan(gpu_simulator.tensorrt, model, BuildSettings(shapes=shapes), timing_cache=None)


def test_parser_errors_name_the_file(gpu_simulator: GpuSimulator, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"this is not a protobuf")
    with pytest.raises(EngineError) as caught:
        build_plan(gpu_simulator.tensorrt, broken, SETTINGS, timing_cache=None)
    assert f"TensorRT cannot parse {broken}" in str(caught.value)


def test_a_failed_parse_is_reported_not_ignored(gpu_simulator: GpuSimulator, model: Path) -> None:
    gpu_simulator.fail_next("parse")
    with pytest.raises(EngineError, match="cannot parse"):
        build_plan(gpu_simulator.tensorrt, model, SETTINGS, timing_cache=None)


def test_a_failed_build_is_an_engine_error_and_caches_nothing(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache
) -> None:
    gpu_simulator.fail_next("build_serialized_network")
    with pytest.raises(EngineError, match="could not build a plan"):
        _load(gpu_simulator, model, cache)
    assert not list(cache.root.glob("*.plan"))


def test_a_missing_model_is_an_engine_error(gpu_simulator: GpuSimulator, tmp_path: Path, cache: PlanCache) -> None:
    with pytest.raises(EngineError, match="cannot read the ONNX model"):
        _load(gpu_simulator, tmp_path / "missing.onnx", cache)


# The plan cache -------------------------------------------------------------------------------------------------


def test_the_second_load_comes_from_the_cache(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, builds: list[str]
) -> None:
    first = _load(gpu_simulator, model, cache)
    assert not first.cached
    assert first.path == cache.path(first.key)
    assert first.path.read_bytes() == first.plan
    second = _load(gpu_simulator, model, cache)
    assert second.cached
    assert second.key == first.key
    assert builds == ["build"]
    engine = load_or_build(
        gpu_simulator.tensorrt,
        _runtime(gpu_simulator),
        model,
        SETTINGS,
        cache,
        device_name=DEVICE,
        compute_capability=CAPABILITY,
    )
    assert engine is not None
    assert builds == ["build"]
    del first, second, engine


def test_builds_hold_a_lock_other_processes_see(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `serve --workers N` runs N processes that would all build the same plan: the build runs under an flock on
    # <key>.lock in the cache, which the other processes wait on (then find the plan cached).
    events: list[str] = []
    real_flock = fcntl.flock
    builder_class = gpu_simulator.tensorrt.Builder
    original: Callable[..., Any] = builder_class.build_serialized_network

    def flock(handle: int, operation: int) -> None:
        events.append(f"flock {Path(os.readlink(f'/proc/self/fd/{handle}')).suffix} {operation == fcntl.LOCK_EX}")
        real_flock(handle, operation)

    def build(self: Any, network: Any, config: Any) -> Any:
        events.append("build")
        return original(self, network, config)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(builder_class, "build_serialized_network", build)
    loaded = _load(gpu_simulator, model, cache)
    assert events == ["flock .lock True", "build"]
    assert (cache.root / f"{loaded.key}.lock").is_file()
    del loaded


def test_changing_the_settings_or_the_model_builds_again(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, builds: list[str]
) -> None:
    keys = {_load(gpu_simulator, model, cache).key}
    keys.add(_load(gpu_simulator, model, cache, BuildSettings(opt_batch=3, max_batch=4)).key)
    identity_model(model, TensorProto.INT32)  # other ONNX bytes at the same path
    keys.add(_load(gpu_simulator, model, cache).key)
    assert len(keys) == 3
    assert builds == ["build"] * 3


def test_the_key_covers_every_part(model: Path, cache: PlanCache, tmp_path: Path) -> None:
    base: dict[str, Any] = {"trt_version": "10.13.0", "device_name": "NVIDIA H100", "compute_capability": (9, 0)}
    reference = cache.key(model, SETTINGS, **base)
    assert cache.key(model, SETTINGS, **base) == reference  # stable
    assert PlanCache(tmp_path / "elsewhere").key(model, SETTINGS, **base) == reference  # not where the cache is
    twin = tmp_path / "copy" / "model.onnx"
    twin.parent.mkdir()
    twin.write_bytes(model.read_bytes())
    assert cache.key(twin, SETTINGS, **base) == reference  # the bytes count, not the path
    variants = [
        cache.key(model, BuildSettings(min_batch=2, opt_batch=2, max_batch=4, workspace_bytes=1 << 26), **base),
        cache.key(model, BuildSettings(opt_batch=2, max_batch=8, workspace_bytes=1 << 26), **base),
        cache.key(model, BuildSettings(opt_batch=2, max_batch=4, workspace_bytes=1 << 27), **base),
        cache.key(
            model, BuildSettings(opt_batch=2, max_batch=4, workspace_bytes=1 << 26, optimization_level=5), **base
        ),
        cache.key(
            model,
            BuildSettings(opt_batch=2, max_batch=4, workspace_bytes=1 << 26, shapes={"x": ((1, 2), (2, 2), (4, 2))}),
            **base,
        ),
        cache.key(model, SETTINGS, **{**base, "trt_version": "10.13.1"}),
        cache.key(model, SETTINGS, **{**base, "device_name": "NVIDIA H200"}),
        cache.key(model, SETTINGS, **{**base, "compute_capability": (9, 1)}),
    ]
    assert len({reference, *variants}) == len(variants) + 1


def test_another_tensorrt_version_or_gpu_builds_its_own_plan(
    model: Path, cache: PlanCache, tmp_path: Path, gpu_simulator: GpuSimulator
) -> None:
    first = _load(gpu_simulator, model, cache)
    gpu_simulator.trt_version = "11.0.0-sim"
    upgraded = load_or_build_plan(
        gpu_simulator.tensorrt,
        _runtime(gpu_simulator),
        model,
        SETTINGS,
        cache,
        device_name=DEVICE,
        compute_capability=CAPABILITY,
    )
    assert not upgraded.cached
    assert upgraded.key != first.key
    other_gpu = load_or_build_plan(
        gpu_simulator.tensorrt,
        _runtime(gpu_simulator),
        model,
        SETTINGS,
        cache,
        device_name="another GPU",
        compute_capability=(9, 0),
    )
    assert not other_gpu.cached
    assert len({first.key, upgraded.key, other_gpu.key}) == 3
    del first, upgraded, other_gpu


def test_a_cached_plan_the_runtime_rejects_is_rebuilt_not_a_crash(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, builds: list[str]
) -> None:
    # A plan from before a TensorRT upgrade, sitting under the key of the new version (as after an upgrade that
    # kept the version string, or a copied cache): the new runtime's deserialize_cuda_engine returns None.
    old = _load(gpu_simulator, model, cache)
    gpu_simulator.trt_version = "10.14.0-sim"
    new_key = cache.key(
        model,
        SETTINGS,
        trt_version=gpu_simulator.tensorrt.__version__,
        device_name=DEVICE,
        compute_capability=CAPABILITY,
    )
    assert new_key != old.key
    cache.put(new_key, old.plan)
    assert _runtime(gpu_simulator).deserialize_cuda_engine(old.plan) is None

    rebuilt = _load(gpu_simulator, model, cache)
    assert rebuilt.key == new_key
    assert not rebuilt.cached
    assert builds == ["build", "build"]
    assert cache.get(new_key) == rebuilt.plan != old.plan
    assert _load(gpu_simulator, model, cache).cached  # and the rebuilt plan is what the cache now serves
    del old, rebuilt


def test_a_garbage_cached_plan_is_rebuilt(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, builds: list[str]
) -> None:
    first = _load(gpu_simulator, model, cache)
    cache.put(first.key, b"\x00 not a plan")
    again = _load(gpu_simulator, model, cache)
    assert not again.cached
    assert builds == ["build", "build"]
    assert cache.get(first.key) == again.plan
    del first, again


def test_a_plan_rejected_even_when_fresh_is_an_error_and_not_cached(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, builds: list[str]
) -> None:
    first = _load(gpu_simulator, model, cache)
    del first
    # The cached plan is rejected, rebuilt once, and the fresh plan is rejected too: an error, not a loop.
    gpu_simulator.fail_next("deserialize_cuda_engine", times=2)
    with pytest.raises(EngineError, match="cannot deserialize it"):
        _load(gpu_simulator, model, cache)
    assert builds == ["build", "build"]
    assert not list(cache.root.glob("*.plan"))


def test_an_unwritable_cache_still_gives_the_engine(gpu_simulator: GpuSimulator, model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache root cannot be a folder here")
    loaded = _load(gpu_simulator, model, PlanCache(blocker / "plans"))
    assert loaded.engine is not None
    assert loaded.path is None
    del loaded


def test_the_timing_cache_is_written_and_reused(
    gpu_simulator: GpuSimulator, model: Path, cache: PlanCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_class = type(gpu_simulator.tensorrt.Builder(gpu_simulator.tensorrt.Logger()).create_builder_config())
    original: Callable[..., Any] = config_class.create_timing_cache
    given: list[bytes] = []

    def spy(self: Any, data: Any) -> Any:
        given.append(bytes(data))
        return original(self, data)

    monkeypatch.setattr(config_class, "create_timing_cache", spy)
    timing = cache.timing_cache_path(
        trt_version=gpu_simulator.tensorrt.__version__, device_name=DEVICE, compute_capability=CAPABILITY
    )
    _load(gpu_simulator, model, cache)
    assert given == [b""]  # nothing to start from
    saved = timing.read_bytes()
    assert saved
    _load(gpu_simulator, model, cache, BuildSettings(opt_batch=3, max_batch=4))
    assert given[1:] == [saved]  # the second build starts from the first one's timings


def test_a_timing_cache_of_another_tensorrt_is_replaced(
    gpu_simulator: GpuSimulator, model: Path, tmp_path: Path
) -> None:
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"timings from some other TensorRT")
    plan = build_plan(gpu_simulator.tensorrt, model, SETTINGS, timing_cache=timing)
    assert plan
    assert timing.read_bytes() != b"timings from some other TensorRT"


# Atomic writes ---------------------------------------------------------------------------------------------------


def test_builds_leave_no_temporary_files(gpu_simulator: GpuSimulator, model: Path, cache: PlanCache) -> None:
    _load(gpu_simulator, model, cache)
    _load(gpu_simulator, model, cache, BuildSettings(opt_batch=1, max_batch=2))
    assert len(list(cache.root.glob("*.plan"))) == 2
    assert len(list(cache.root.glob("timing-*.cache"))) == 1
    assert _stray_files(cache.root) == []


def test_a_failed_write_keeps_the_old_plan_and_leaves_nothing(
    cache: PlanCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache.put("k", b"old plan")

    def broken_replace(source: Any, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        cache.put("k", b"new plan")
    monkeypatch.undo()
    assert cache.get("k") == b"old plan"
    assert _stray_files(cache.root) == []


def test_write_atomically_creates_the_folder(tmp_path: Path) -> None:
    target = write_atomically(tmp_path / "a" / "b" / "model.plan", b"plan")
    assert target.read_bytes() == b"plan"
    assert _stray_files(tmp_path) == []


def test_discard_and_get_of_a_missing_plan(cache: PlanCache) -> None:
    assert cache.get("missing") is None
    cache.discard("missing")
    cache.put("k", b"x")
    cache.discard("k")
    assert cache.get("k") is None


def test_the_cache_root_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLAN_CACHE_ENV, str(tmp_path / "from-env"))
    assert PlanCache().root == tmp_path / "from-env"
    monkeypatch.delenv(PLAN_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert PlanCache().root == tmp_path / "home" / ".cache" / "tensorgate" / "plans"
    assert PlanCache(tmp_path / "given").root == tmp_path / "given"


# Settings --------------------------------------------------------------------------------------------------------


def test_settings_are_checked_and_frozen() -> None:
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        BuildSettings(min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(ValueError, match="workspace"):
        BuildSettings(workspace_bytes=0)
    with pytest.raises(ValueError, match="optimization level"):
        BuildSettings(optimization_level=6)
    with pytest.raises(ValueError, match="dimension 1 needs"):
        BuildSettings(shapes={"x": ((1, 8), (1, 4), (1, 16))})
    shapes: dict[str, ShapeRange] = {"x": ((1, 2), (2, 2), (4, 2))}
    settings = BuildSettings(shapes=shapes)
    shapes["y"] = ((1,), (1,), (1,))
    assert set(settings.shapes) == {"x"}
    assert hash(settings) == hash(BuildSettings(shapes={"x": ((1, 2), (2, 2), (4, 2))}))


def test_settings_from_model_parameters() -> None:
    defaults = build_settings_from_parameters({}, 64)
    assert (defaults.min_batch, defaults.opt_batch, defaults.max_batch) == (1, 8, 64)
    assert defaults.workspace_bytes == 1 << 30
    small = build_settings_from_parameters({}, 4)
    assert (small.opt_batch, small.max_batch) == (4, 4)
    unbatched = build_settings_from_parameters({}, 0)
    assert (unbatched.min_batch, unbatched.opt_batch, unbatched.max_batch) == (1, 1, 1)
    given = build_settings_from_parameters(
        {
            "plan_opt_batch": "16",
            "plan_workspace_mib": "256",
            "plan_optimization_level": "5",
            "plan_shapes": "x=1x1x4:8x16x4:32x64x4, mask=1x1:8x16:32x64",
        },
        32,
    )
    assert given.opt_batch == 16
    assert given.workspace_bytes == 256 << 20
    assert given.optimization_level == 5
    assert dict(given.shapes) == {
        "x": ((1, 1, 4), (8, 16, 4), (32, 64, 4)),
        "mask": ((1, 1), (8, 16), (32, 64)),
    }


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"plan_opt_batch": "many"}, "'plan_opt_batch' must be an integer"),
        ({"plan_opt_batch": "128"}, "'plan_opt_batch' must be between 1 and max_batch_size"),
        ({"plan_workspace_mib": "0"}, "'plan_workspace_mib' must be at least 1"),
        ({"plan_optimization_level": "9"}, "optimization level must be 0 to 5"),
        ({"plan_shapes": "x=1x4:2x4"}, "'plan_shapes': expected NAME=MIN:OPT:MAX"),
        ({"plan_shapes": "x=1x4:2xfour:3x4"}, "'plan_shapes': input 'x': '2xfour' is not a shape"),
    ],
)
def test_bad_model_parameters_are_named(parameters: dict[str, str], expected: str) -> None:
    with pytest.raises(EngineError, match=expected):
        build_settings_from_parameters(parameters, 64)


def test_shape_ranges_parse() -> None:
    assert parse_shape_range("input=1x3x224x224:8x3x224x224:32x3x224x224") == (
        "input",
        ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
    )
    assert parse_shape_range("a=b=1:2:3")[0] == "a=b"  # names may hold "="; the last one separates
    with pytest.raises(ValueError, match="at least 1"):
        parse_shape_range("x=0x4:1x4:2x4")


def test_atomic_writes_give_the_file_the_umask_mode_not_mkstemp_0600(tmp_path: Path) -> None:
    # A plan built by one user must be readable by the server's own user (uid 10001 in the images).
    previous = os.umask(0o022)
    try:
        written = write_atomically(tmp_path / "model.plan", b"plan")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
