"""`tensorgate build-engine MODEL.onnx`: build (or fetch from the plan cache) a TensorRT plan for this GPU.

    tensorgate build-engine examples/models/digits/1/model.onnx --max-batch 64
    tensorgate build-engine model.onnx --output repo/m/1/model.plan --shape tokens=1x16:8x128:32x512

The plan is written to --output (default: beside the model, as MODEL.plan) and cached under the plan cache's
key (ONNX hash, TensorRT version, GPU name and compute capability, builder settings), so building the same model
again on the same kind of GPU is instant and a server loading it with `plan_build: "on_load"` finds it too.

Exit status: 0 on success; 1 when TensorRT cannot parse or build the model; 2 for a usage error, a missing
file, or when this machine cannot build plans (TensorRT or cuda-python not installed, no GPU).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from tensorgate.client.cli import positive_int
from tensorgate.engines.base import EngineError
from tensorgate.engines.plans import (
    PLAN_CACHE_ENV,
    BuildSettings,
    PlanCache,
    ShapeRange,
    format_shape,
    load_or_build_plan,
    parse_shape_range,
    write_atomically,
)

__all__ = ["main"]

_INSTALL_HINT = "pip install 'tensorgate[tensorrt]' on a machine with an NVIDIA GPU and driver"
_MIB = 1 << 20
_DEFAULT_OPT_BATCH = BuildSettings().opt_batch


class _CannotRunError(Exception):
    """This machine cannot build plans, or the command line is wrong: exit status 2."""


def _device_index(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a GPU index (0, 1, ...), got {value!r}")
    return number


def _shape_range(value: str) -> tuple[str, ShapeRange]:
    try:
        return parse_shape_range(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    defaults = BuildSettings()
    parser = argparse.ArgumentParser(
        prog="tensorgate build-engine",
        description="Build a TensorRT plan from an ONNX model for this machine's GPU (strongly typed: precisions "
        "come from the ONNX graph), with one optimization profile covering every input, and a timing cache. "
        "Plans are cached: the same model, settings, TensorRT and GPU model are built once.",
        epilog="Exit status: 0 ok; 1 TensorRT cannot parse or build the model; 2 bad usage, a missing file, or no "
        "TensorRT / GPU here.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX model")
    parser.add_argument(
        "--output", "-o", type=Path, metavar="PATH", help="where to write the plan (default: MODEL.plan beside it)"
    )
    batch = parser.add_argument_group("optimization profile (the first dimension of each input is the batch)")
    batch.add_argument("--min-batch", type=positive_int, default=defaults.min_batch, metavar="N")
    batch.add_argument(
        "--opt-batch",
        type=positive_int,
        metavar="N",
        help=f"the size tuned for (default: {defaults.opt_batch}, or --max-batch if smaller)",
    )
    batch.add_argument(
        "--max-batch", type=positive_int, default=defaults.max_batch, metavar="N", help="the model's max_batch_size"
    )
    batch.add_argument(
        "--shape",
        dest="shapes",
        action="append",
        type=_shape_range,
        default=[],
        metavar="NAME=MIN:OPT:MAX",
        help="full min/opt/max shapes of one input, dims as 1x3x224x224 (repeat per input); needed for inputs "
        "with dynamic dimensions besides the batch",
    )
    builder = parser.add_argument_group("builder")
    builder.add_argument(
        "--workspace",
        type=positive_int,
        default=defaults.workspace_bytes // _MIB,
        metavar="MIB",
        help="workspace memory limit in MiB (default: %(default)s)",
    )
    builder.add_argument(
        "--optimization-level",
        type=int,
        choices=range(6),
        metavar="0-5",
        help="TensorRT's builder optimization level (default: TensorRT's, 3)",
    )
    builder.add_argument("--device", type=_device_index, default=0, metavar="N", help="the GPU to build on (default 0)")
    cache = parser.add_argument_group("caches")
    cache.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help=f"the plan cache (default: ${PLAN_CACHE_ENV}, else ~/.cache/tensorgate/plans)",
    )
    cache.add_argument(
        "--timing-cache",
        type=Path,
        metavar="PATH",
        help="TensorRT's timing cache, read and updated (default: one in the plan cache per TensorRT and GPU)",
    )
    cache.add_argument("--rebuild", action="store_true", help="ignore a cached plan and build it again")
    return parser


def _settings(args: argparse.Namespace) -> BuildSettings:
    shapes: dict[str, ShapeRange] = {}
    for name, shape_range in args.shapes:
        if name in shapes:
            raise _CannotRunError(f"--shape is given twice for input {name!r}")
        shapes[name] = shape_range
    try:
        return BuildSettings(
            min_batch=args.min_batch,
            opt_batch=args.opt_batch if args.opt_batch is not None else min(_DEFAULT_OPT_BATCH, args.max_batch),
            max_batch=args.max_batch,
            workspace_bytes=args.workspace * _MIB,
            shapes=shapes,
            optimization_level=args.optimization_level,
        )
    except ValueError as exc:
        raise _CannotRunError(str(exc)) from None


def _import(name: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as exc:  # OSError: the bindings are there but libnvinfer / libcudart is not
        raise _CannotRunError(f"{what} is not installed ({exc}): {_INSTALL_HINT}") from None


def _check(cudart: ModuleType, result: tuple[object, ...], call: str) -> None:
    error = result[0]
    if error != cudart.cudaError_t.cudaSuccess:
        raise _CannotRunError(f"{call} failed: {getattr(error, 'name', error)}")


def _gpu(cudart: ModuleType, device: int) -> tuple[str, tuple[int, int]]:
    """Make `device` current and return its name and compute capability; _CannotRunError when there is no such GPU."""
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count < 1:
        reason = getattr(error, "name", error) if error != cudart.cudaError_t.cudaSuccess else "0 devices"
        raise _CannotRunError(f"no CUDA GPU here (cudaGetDeviceCount: {reason}); TensorRT plans are built on the GPU")
    if device >= count:
        raise _CannotRunError(f"--device {device}: this machine has {count} GPU{'s' if count > 1 else ''}")
    _check(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
    result = cudart.cudaGetDeviceProperties(device)
    _check(cudart, result, f"cudaGetDeviceProperties({device})")
    properties = result[1]
    raw = properties.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return name, (int(properties.major), int(properties.minor))


def _size(count: int) -> str:
    return f"{count / _MIB:.1f} MiB" if count >= _MIB else f"{count / 1024:.1f} KiB"


def _build(args: argparse.Namespace) -> int:
    settings = _settings(args)
    model: Path = args.model
    if not model.is_file():
        raise _CannotRunError(f"{model} is not a file")
    output: Path = args.output if args.output is not None else model.with_suffix(".plan")
    if output.resolve() == model.resolve():
        raise _CannotRunError(f"--output {output} would overwrite the ONNX model")
    trt = _import("tensorrt", "TensorRT")
    cudart = _import("cuda.bindings.runtime", "cuda-python")
    device_name, capability = _gpu(cudart, args.device)
    cache = PlanCache(args.cache_dir)
    if args.rebuild:
        cache.discard(
            cache.key(
                model,
                settings,
                trt_version=str(trt.__version__),
                device_name=device_name,
                compute_capability=capability,
            )
        )
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    started = time.perf_counter()
    loaded = load_or_build_plan(
        trt,
        runtime,
        model,
        settings,
        cache,
        device_name=device_name,
        compute_capability=capability,
        timing_cache=args.timing_cache,
    )
    elapsed = time.perf_counter() - started
    try:
        write_atomically(output, loaded.plan)
    except OSError as exc:
        raise _CannotRunError(f"cannot write {output}: {exc}") from None
    profile = ", ".join(f"{name}={':'.join(map(format_shape, r))}" for name, r in settings.shapes.items())
    batches = f"batch {settings.min_batch}/{settings.opt_batch}/{settings.max_batch}"
    origin = (
        f"from the plan cache ({loaded.path})"
        if loaded.cached
        else f"built in {elapsed:.1f} s" + (f", cached as {loaded.path}" if loaded.path else ", not cached")
    )
    print(
        f"wrote {output} ({_size(len(loaded.plan))}): TensorRT {trt.__version__} plan for {device_name} "
        f"(compute capability {capability[0]}.{capability[1]}), {batches}{', ' + profile if profile else ''}; "
        f"{origin}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tensorgate build-engine` with `argv` (default: `sys.argv[1:]`) and return its exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # The plan module logs TensorRT's warnings, a rejected cached plan or an unwritable cache: show those on
    # stderr, without configuring the root logger of a process that may have its own. Errors are left out: the
    # one-line error at the end says what failed, TensorRT's errors included.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(lambda record: record.levelno < logging.ERROR)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    plans_log = logging.getLogger("tensorgate.engines.plans")
    plans_log.addHandler(handler)
    try:
        return _build(_parser().parse_args(arguments))
    except SystemExit as exc:  # argparse's --help and usage errors: return the status instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except _CannotRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        plans_log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
