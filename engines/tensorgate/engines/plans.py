"""TensorRT plans: built from ONNX with a timing cache, and cached under a key of everything that makes one valid.

A plan (a serialized TensorRT engine) is only good for the TensorRT version and the GPU model it was built
with, and building one takes from seconds to many minutes. So plans are cached, keyed by the SHA-256 of the
ONNX file, the TensorRT version, the GPU's name and compute capability, and the builder settings. A cached plan
that `deserialize_cuda_engine` still rejects (it returns None: a TensorRT upgrade under the same version string,
a driver change, a damaged file) is a cache miss: it is discarded and rebuilt, never a crash.

Networks are built strongly typed (precision comes from the ONNX graph: TensorRT 11 removed the precision
builder flags) with one optimization profile covering every input. Each input's range is, in order: the full
shapes given for it in `BuildSettings.shapes`; its own shape when it has no dynamic dimension; else its first
dimension is the batch dimension, ranging over `min_batch`/`opt_batch`/`max_batch`. Any other dynamic
dimension must be given in `shapes`, or the build fails naming the input and the dimension.

Everything here blocks (a build runs for minutes on a real GPU) and is free of asyncio: the engine calls
`load_or_build` from a worker thread. The `tensorrt` module is passed in rather than imported, so the engine's
lazily imported module (or a test's simulator) is the one used. Builds run on the calling thread's current
CUDA device (`cudaSetDevice` first).

The key hashes the ONNX file itself; weights kept in external data files beside it are not part of the key, so
after changing only those, clear the cache (or change a setting).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any

from tensorgate.engines.base import EngineError

if TYPE_CHECKING:
    import tensorrt

__all__ = [
    "DEFAULT_PLAN_CACHE",
    "PLAN_CACHE_ENV",
    "PLAN_PARAMETERS",
    "BuildSettings",
    "LoadedPlan",
    "PlanCache",
    "ShapeRange",
    "build_plan",
    "build_settings_from_parameters",
    "format_shape",
    "load_or_build",
    "load_or_build_plan",
    "parse_shape_range",
    "write_atomically",
]

log = logging.getLogger(__name__)

#: The environment variable that moves the plan cache.
PLAN_CACHE_ENV = "TENSORGATE_PLAN_CACHE"
#: Where plans are cached when neither the caller nor $TENSORGATE_PLAN_CACHE says.
DEFAULT_PLAN_CACHE = Path("~/.cache/tensorgate/plans")

#: min, opt and max full shapes (batch dimension included) of one input.
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

# Bumped whenever what goes into a plan changes in a way the other key parts do not show.
_KEY_FORMAT = "tensorgate-plan/1"
_MIB = 1 << 20
# TensorRT's builder optimization levels.
_OPTIMIZATION_LEVELS = range(6)
_DEFAULT_OPT_BATCH = 8
_DEFAULT_WORKSPACE_MIB = 1024

#: The model config `parameters` that `build_settings_from_parameters` reads.
PLAN_PARAMETERS = ("plan_opt_batch", "plan_workspace_mib", "plan_shapes", "plan_optimization_level")


# Settings ---------------------------------------------------------------------------------------------------


def format_shape(shape: tuple[int, ...]) -> str:
    """A shape as the command line writes it: (1, 3, 224, 224) -> "1x3x224x224"."""
    return "x".join(str(dim) for dim in shape)


def _parse_dims(text: str, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(part) for part in text.split("x"))
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a shape such as 1x3x224x224") from None
    if any(dim < 1 for dim in dims):
        raise ValueError(f"{what}: every dimension of {text!r} must be at least 1")
    return dims


def parse_shape_range(text: str) -> tuple[str, ShapeRange]:
    """Parse "NAME=MIN:OPT:MAX" with dims written like 1x3x224x224; ValueError says what is wrong."""
    name, sep, ranges = text.rpartition("=")
    parts = ranges.split(":")
    if not sep or not name or len(parts) != 3:
        raise ValueError(f"expected NAME=MIN:OPT:MAX (e.g. input=1x3x224x224:8x3x224x224:32x3x224x224), got {text!r}")
    low, opt, high = (_parse_dims(part, f"input {name!r}") for part in parts)
    return name, (low, opt, high)


def _check_range(name: str, shapes: ShapeRange) -> None:
    low, opt, high = shapes
    if not len(low) == len(opt) == len(high):
        raise ValueError(f"input {name!r}: min, opt and max shapes have different ranks: {shapes}")
    for axis, (a, b, c) in enumerate(zip(low, opt, high, strict=True)):
        if not 1 <= a <= b <= c:
            raise ValueError(f"input {name!r}: dimension {axis} needs 1 <= min <= opt <= max, got {a}, {b}, {c}")


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """How to build a plan. Every field is part of the plan cache key.

    `shapes` maps an input name to its min/opt/max full shapes (batch dimension included) and overrides the
    batch range for that input; it is required for inputs with dynamic dimensions other than the first.
    `optimization_level` is TensorRT's builder optimization level (0-5; None keeps TensorRT's default, 3).
    Raises ValueError naming the bad field.
    """

    min_batch: int = 1
    opt_batch: int = _DEFAULT_OPT_BATCH
    max_batch: int = 64
    workspace_bytes: int = _DEFAULT_WORKSPACE_MIB * _MIB
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)
    optimization_level: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch sizes need 1 <= min <= opt <= max, got min {self.min_batch}, opt {self.opt_batch}, "
                f"max {self.max_batch}"
            )
        if self.workspace_bytes < 1:
            raise ValueError(f"the workspace must be at least 1 byte, got {self.workspace_bytes}")
        if self.optimization_level is not None and self.optimization_level not in _OPTIMIZATION_LEVELS:
            raise ValueError(f"the optimization level must be 0 to 5, got {self.optimization_level}")
        shapes: dict[str, ShapeRange] = {}
        for name, given in self.shapes.items():
            low, opt, high = (tuple(int(dim) for dim in shape) for shape in given)
            _check_range(name, (low, opt, high))
            shapes[name] = (low, opt, high)
        # Frozen means frozen: a caller's dict changed later must not change the settings (or their key).
        object.__setattr__(self, "shapes", MappingProxyType(shapes))

    def canonical(self) -> dict[str, Any]:
        """The settings as a JSON-able dict with a stable order: what the cache key hashes."""
        return {
            "min_batch": self.min_batch,
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
            "workspace_bytes": self.workspace_bytes,
            "shapes": {name: [list(s) for s in self.shapes[name]] for name in sorted(self.shapes)},
            "optimization_level": self.optimization_level,
        }

    def __hash__(self) -> int:
        return hash(json.dumps(self.canonical(), sort_keys=True))


def _int_parameter(parameters: Mapping[str, str], key: str, default: int) -> int:
    text = parameters.get(key)
    if text is None:
        return default
    try:
        return int(text.strip())
    except ValueError:
        raise EngineError(f"parameter {key!r} must be an integer, got {text!r}") from None


def build_settings_from_parameters(parameters: Mapping[str, str], max_batch_size: int) -> BuildSettings:
    """The build settings of a model from its config: `max_batch_size` and these `parameters`:

    - `plan_opt_batch`: the batch size TensorRT tunes for (default: 8, or max_batch_size if smaller);
    - `plan_workspace_mib`: the builder's workspace limit in MiB (default 1024);
    - `plan_shapes`: "NAME=MIN:OPT:MAX,..." full shapes (dims as 1x3x224x224) for inputs whose dimensions other
      than the batch dimension vary;
    - `plan_optimization_level`: TensorRT's builder optimization level, 0-5.

    The batch range is always 1 to max_batch_size, since the batcher sends any batch size up to it (a model
    without batching, max_batch_size 0, gets a batch range of exactly 1). Raises EngineError naming the bad
    parameter.
    """
    if max_batch_size < 0:
        raise EngineError(f"max_batch_size must not be negative, got {max_batch_size}")
    high = max(max_batch_size, 1)
    opt = _int_parameter(parameters, "plan_opt_batch", min(_DEFAULT_OPT_BATCH, high))
    if not 1 <= opt <= high:
        raise EngineError(f"parameter 'plan_opt_batch' must be between 1 and max_batch_size ({high}), got {opt}")
    workspace = _int_parameter(parameters, "plan_workspace_mib", _DEFAULT_WORKSPACE_MIB)
    if workspace < 1:
        raise EngineError(f"parameter 'plan_workspace_mib' must be at least 1, got {workspace}")
    level_text = parameters.get("plan_optimization_level")
    level = None if level_text is None else _int_parameter(parameters, "plan_optimization_level", 0)
    shapes: dict[str, ShapeRange] = {}
    for item in parameters.get("plan_shapes", "").split(","):
        if item.strip():
            try:
                name, shape_range = parse_shape_range(item.strip())
            except ValueError as exc:
                raise EngineError(f"parameter 'plan_shapes': {exc}") from None
            shapes[name] = shape_range
    try:
        return BuildSettings(
            min_batch=1,
            opt_batch=opt,
            max_batch=high,
            workspace_bytes=workspace * _MIB,
            shapes=shapes,
            optimization_level=level,
        )
    except ValueError as exc:
        raise EngineError(f"plan parameters: {exc}") from None


# Files ------------------------------------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`, so that readers
    (another server process, a crashed build) never see a partial file. Creates the folder; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a plan built by one user is served by another (the server's own uid in
        # the images), so give it the mode an ordinary file would get under the process's umask.
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and put back
    os.umask(mask)
    return mask


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PlanCache:
    """Plans on disk, one file per key: `<root>/<key>.plan`, plus one timing cache per TensorRT version and GPU.

    `root` defaults to $TENSORGATE_PLAN_CACHE, else ~/.cache/tensorgate/plans. Safe to share between threads
    and processes: files are replaced atomically, and a reader sees a whole old plan or a whole new one.
    """

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            root = Path(os.environ.get(PLAN_CACHE_ENV) or DEFAULT_PLAN_CACHE)
        self.root = root.expanduser()

    def __repr__(self) -> str:
        return f"PlanCache({str(self.root)!r})"

    def key(
        self,
        onnx_file: Path,
        settings: BuildSettings,
        *,
        trt_version: str,
        device_name: str,
        compute_capability: tuple[int, int],
    ) -> str:
        """The cache key (hex SHA-256) of the plan built from `onnx_file` with `settings` on that TensorRT and
        GPU. EngineError when the ONNX file cannot be read."""
        try:
            onnx_digest = _sha256_file(onnx_file)
        except OSError as exc:
            raise EngineError(f"cannot read the ONNX model {onnx_file}: {exc}") from None
        document = {
            "format": _KEY_FORMAT,
            "onnx_sha256": onnx_digest,
            "tensorrt": trt_version,
            "device": device_name,
            "compute_capability": list(compute_capability),
            "settings": settings.canonical(),
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        """Where the plan of `key` is (or would be) stored."""
        return self.root / f"{key}.plan"

    def get(self, key: str) -> bytes | None:
        """The cached plan of `key`, or None when there is none (or it cannot be read: a miss, not an error)."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the cached plan %s (%s); building it again", self.path(key), exc)
            return None

    def put(self, key: str, plan: bytes) -> Path:
        """Store `plan` under `key` atomically; returns its path. OSError when the cache cannot be written."""
        return write_atomically(self.path(key), plan)

    def discard(self, key: str) -> None:
        """Forget the plan of `key` (nothing happens when there is none)."""
        self.path(key).unlink(missing_ok=True)

    def timing_cache_path(self, *, trt_version: str, device_name: str, compute_capability: tuple[int, int]) -> Path:
        """The timing cache shared by every build on that TensorRT version and GPU model.

        Timing results are per GPU and TensorRT version, so each pair gets its own file rather than one file
        that TensorRT would keep rejecting as a mismatch.
        """
        identity = json.dumps([trt_version, device_name, list(compute_capability)])
        return self.root / f"timing-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.cache"


# Building ---------------------------------------------------------------------------------------------------


def _profile_shapes(
    onnx_file: Path, inputs: Mapping[str, tuple[int, ...]], settings: BuildSettings
) -> dict[str, ShapeRange]:
    """The min/opt/max shapes of every network input, or EngineError naming every input it cannot range."""
    unknown = sorted(set(settings.shapes) - set(inputs))
    if unknown:
        raise EngineError(
            f"shapes are given for {', '.join(map(repr, unknown))}, which {onnx_file} does not take as input "
            f"(its inputs: {', '.join(map(repr, inputs))})"
        )
    ranges: dict[str, ShapeRange] = {}
    problems: list[str] = []
    for name, shape in inputs.items():
        given = settings.shapes.get(name)
        if given is not None:
            for label, full in zip(("min", "opt", "max"), given, strict=True):
                if len(full) != len(shape):
                    problems.append(f"input {name!r} has {len(shape)} dimensions {list(shape)}, {label} shape {full}")
                    break
                clash = [axis for axis, dim in enumerate(shape) if dim >= 0 and dim != full[axis]]
                if clash:
                    problems.append(
                        f"input {name!r} has fixed dimension {clash[0]} = {shape[clash[0]]}, but its {label} shape "
                        f"is {format_shape(full)}"
                    )
                    break
            else:
                ranges[name] = given
            continue
        if all(dim >= 0 for dim in shape):
            ranges[name] = (shape, shape, shape)
            continue
        missing = [axis for axis, dim in enumerate(shape) if dim < 0 and axis > 0]
        if missing:
            problems.append(
                f"input {name!r} {list(shape)} has dynamic dimension{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))} besides the batch dimension: give its range as "
                f"{name}=MIN:OPT:MAX (build-engine --shape, or the parameter plan_shapes)"
            )
            continue
        rest = shape[1:]
        ranges[name] = ((settings.min_batch, *rest), (settings.opt_batch, *rest), (settings.max_batch, *rest))
    if problems:
        raise EngineError(f"cannot make an optimization profile for {onnx_file}: " + "; ".join(problems))
    return ranges


def _parser_errors(parser: tensorrt.OnnxParser) -> str:
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        messages.append(f"node {node}: {error.desc()}" if node >= 0 else error.desc())
    return "; ".join(messages) or "no error reported"


def _read_timing_cache(path: Path | None) -> bytes:
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        log.warning("cannot read the timing cache %s (%s); starting an empty one", path, exc)
        return b""


def _use_timing_cache(config: tensorrt.IBuilderConfig, path: Path | None) -> None:
    data = _read_timing_cache(path)
    cache = config.create_timing_cache(data)
    # A cache from another TensorRT or GPU is refused (ignore_mismatch=False: mixing them can give wrong
    # tactics); start from an empty one, which is then saved over it.
    if cache is None or not config.set_timing_cache(cache, False):
        if not data:
            raise EngineError("TensorRT refused an empty timing cache")
        log.warning("TensorRT refused the timing cache %s (another TensorRT or GPU?); starting an empty one", path)
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, False):
            raise EngineError("TensorRT refused an empty timing cache")


def _save_timing_cache(config: tensorrt.IBuilderConfig, path: Path | None) -> None:
    if path is None:
        return
    try:
        write_atomically(path, bytes(config.get_timing_cache().serialize()))
    except OSError as exc:  # the plan is built; a cache that cannot be saved only slows the next build
        log.warning("cannot save the timing cache %s: %s", path, exc)


def build_plan(trt: ModuleType, onnx_file: Path, settings: BuildSettings, *, timing_cache: Path | None) -> bytes:
    """Build a serialized plan from `onnx_file` on the current CUDA device.

    `timing_cache` is read when it exists and written back (atomically) after the build; None builds without
    keeping one. Raises EngineError naming the file and what failed: every ONNX parser error, inputs whose
    dynamic dimensions have no range, or a build TensorRT refused.
    """
    try:
        model = onnx_file.read_bytes()
    except OSError as exc:
        raise EngineError(f"cannot read the ONNX model {onnx_file}: {exc}") from None
    try:
        return _build(trt, onnx_file, model, settings, timing_cache)
    except (RuntimeError, TypeError, ValueError) as exc:  # what TensorRT's bindings raise for bad arguments
        raise EngineError(f"TensorRT failed building a plan from {onnx_file}: {exc}") from exc


def trt_logger(trt: ModuleType) -> tuple[tensorrt.ILogger, collections.deque[str]]:
    """A logger for `trt` (the tensorrt module in use) that forwards TensorRT's messages to Python logging, and
    the last few errors it logged, which our own error messages quote."""
    errors: collections.deque[str] = collections.deque(maxlen=8)
    severity = trt.ILogger.Severity

    def forward(_logger: object, level: tensorrt.ILogger.Severity, msg: str) -> None:
        if level in (severity.INTERNAL_ERROR, severity.ERROR):
            errors.append(msg)
            log.error("TensorRT: %s", msg)
        elif level == severity.WARNING:
            log.warning("TensorRT: %s", msg)
        else:
            log.debug("TensorRT: %s", msg)

    # A subclass of the given module's ILogger (made here, since the module is only known now); ILogger's own
    # __init__ sets up TensorRT's side.
    logger: tensorrt.ILogger = type("TensorgateLogger", (trt.ILogger,), {"log": forward})()
    return logger, errors


def _build(trt: ModuleType, onnx_file: Path, model: bytes, settings: BuildSettings, timing_cache: Path | None) -> bytes:
    logger, errors = trt_logger(trt)
    builder: tensorrt.Builder = trt.Builder(logger)
    # Strongly typed: precisions come from the ONNX graph (TensorRT 11 has no precision flags; 10 has both).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    # The path lets the parser find weights stored in external data files beside the model.
    if not parser.parse(model, str(onnx_file)):
        raise EngineError(f"TensorRT cannot parse {onnx_file}: {_parser_errors(parser)}")

    inputs = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        inputs[tensor.name] = tuple(int(dim) for dim in tensor.shape)
    ranges = _profile_shapes(onnx_file, inputs, settings)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in ranges.items():
        profile.set_shape(name, low, opt, high)
    if config.add_optimization_profile(profile) < 0:
        shown = ", ".join(f"{name}={':'.join(map(format_shape, r))}" for name, r in ranges.items())
        raise EngineError(f"TensorRT refused the optimization profile for {onnx_file}: {shown}")
    _use_timing_cache(config, timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = "; ".join(list(errors)[-3:]) or "build_serialized_network returned None"
        raise EngineError(f"TensorRT could not build a plan from {onnx_file}: {reason}")
    plan = bytes(serialized)
    _save_timing_cache(config, timing_cache)
    return plan


# Loading ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedPlan:
    """A deserialized engine, the plan it came from, and whether that plan came from the cache."""

    engine: tensorrt.ICudaEngine
    plan: bytes
    key: str
    # Where the plan is cached; None when the cache could not be written.
    path: Path | None
    cached: bool


_locks_guard = threading.Lock()
_build_locks: dict[tuple[Path, str], threading.Lock] = {}


def _build_lock(cache: PlanCache, key: str) -> threading.Lock:
    """One lock per cached plan, so two models on the same ONNX file in one process build it once."""
    with _locks_guard:
        return _build_locks.setdefault((cache.root, key), threading.Lock())


@contextlib.contextmanager
def _process_lock(cache: PlanCache, key: str) -> Iterator[None]:
    """An exclusive lock on `<key>.lock` in the cache, so that the processes of `serve --workers N` (or several
    servers sharing a cache) build a plan once: the others wait, then find it cached. Without a writable cache
    there is nothing to share, and no lock."""
    try:
        cache.root.mkdir(parents=True, exist_ok=True)
        handle = os.open(cache.root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.debug("no cross-process lock for plan %s: %s", key, exc)
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def load_or_build_plan(
    trt: ModuleType,
    runtime: tensorrt.Runtime,
    onnx_file: Path,
    settings: BuildSettings,
    cache: PlanCache,
    *,
    device_name: str,
    compute_capability: tuple[int, int],
    timing_cache: Path | None = None,
) -> LoadedPlan:
    """`load_or_build`, also returning the plan's bytes, cache key and path, and whether it was cached.

    `timing_cache` defaults to the cache's timing cache for this TensorRT version and GPU.
    """
    trt_version = str(trt.__version__)
    key = cache.key(
        onnx_file, settings, trt_version=trt_version, device_name=device_name, compute_capability=compute_capability
    )
    if timing_cache is None:
        timing_cache = cache.timing_cache_path(
            trt_version=trt_version, device_name=device_name, compute_capability=compute_capability
        )
    with _build_lock(cache, key), _process_lock(cache, key):
        plan = cache.get(key)
        if plan is not None:
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is not None:
                return LoadedPlan(engine, plan, key, cache.path(key), cached=True)
            log.warning(
                "TensorRT %s rejected the cached plan %s for %s; discarding it and building it again",
                trt_version,
                cache.path(key),
                onnx_file,
            )
            cache.discard(key)
        log.info("building a TensorRT %s plan from %s on %s (%s)", trt_version, onnx_file, device_name, settings)
        plan = build_plan(trt, onnx_file, settings, timing_cache=timing_cache)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineError(
                f"TensorRT {trt_version} built a plan from {onnx_file} but cannot deserialize it on {device_name}"
            )
        path: Path | None
        try:
            path = cache.put(key, plan)
        except OSError as exc:  # the engine is here; only the next load pays for the cache being unwritable
            log.warning("cannot cache the plan for %s in %s: %s", onnx_file, cache.root, exc)
            path = None
        return LoadedPlan(engine, plan, key, path, cached=False)


def load_or_build(
    trt: ModuleType,
    runtime: tensorrt.Runtime,
    onnx_file: Path,
    settings: BuildSettings,
    cache: PlanCache,
    *,
    device_name: str,
    compute_capability: tuple[int, int],
) -> tensorrt.ICudaEngine:
    """The engine for `onnx_file` on this TensorRT and GPU: from the cached plan when there is one that
    `runtime` accepts, else built (on the current CUDA device), cached and deserialized.

    A cached plan that `deserialize_cuda_engine` rejects is discarded and rebuilt once. Raises EngineError when
    the ONNX model cannot be read, parsed or built, or TensorRT rejects even the fresh plan. Blocks for as long
    as a build takes: call it from a worker thread.
    """
    loaded = load_or_build_plan(
        trt, runtime, onnx_file, settings, cache, device_name=device_name, compute_capability=compute_capability
    )
    return loaded.engine
