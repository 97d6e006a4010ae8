"""The fake `tensorrt` module's build side: Builder, networks parsed from ONNX, builder config, profiles, timing cache.

The "network" is the ONNX model itself (its inputs, outputs and types read through ONNX Runtime); building checks
the optimization profiles the way TensorRT does (every dynamic input needs min/opt/max, within rank and static
dims, min <= opt <= max) and serializes a plan (plans.py) stamped with the TensorRT version and the current device.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from tests.support.gpu_simulator.plans import (
    PlanError,
    PlanHeader,
    PlanTensor,
    Profile,
    decode_timing_cache,
    encode_plan,
    encode_timing_cache,
)
from tests.support.gpu_simulator.trt_types import (
    ORT_TYPES,
    DataType,
    Dims,
    IHostMemory,
    ILogger,
    MemoryPoolType,
    TrtContext,
)

__all__ = [
    "Builder",
    "IBuilderConfig",
    "INetworkDefinition",
    "IOptimizationProfile",
    "ITensor",
    "ITimingCache",
    "OnnxParser",
    "ParserError",
]

Shape = tuple[int, ...]


class ITensor:
    """A network input or output."""

    def __init__(self, name: str, shape: Shape, dtype: DataType) -> None:
        self._name, self._shape, self._dtype = name, shape, dtype

    @property
    def name(self) -> str:
        """The tensor's name."""
        return self._name

    @property
    def shape(self) -> Dims:
        """Its shape, -1 for dynamic dimensions."""
        return Dims(self._shape)

    @property
    def dtype(self) -> DataType:
        """Its element type."""
        return self._dtype


class INetworkDefinition:
    """A network: empty until an OnnxParser fills it."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_bytes: bytes | None = None
        self.name = "network"
        self.inputs: list[ITensor] = []
        self.outputs: list[ITensor] = []

    @property
    def num_inputs(self) -> int:
        """How many inputs the network has."""
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        """How many outputs the network has."""
        return len(self.outputs)

    def get_input(self, index: int) -> ITensor:
        """Input `index`."""
        return self.inputs[index]

    def get_output(self, index: int) -> ITensor:
        """Output `index`."""
        return self.outputs[index]


class IOptimizationProfile:
    """Per-input min/opt/max shapes (checked when the network is built)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Shape, Shape, Shape]] = {}

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
        """Set the range of shapes `input` accepts."""
        self.shapes[input] = tuple(tuple(operator.index(d) for d in s) for s in (min, opt, max))  # type: ignore[assignment]


class ITimingCache:
    """Layer timings: the simulator notes which (model, profiles) it has built."""

    def __init__(self, trt_version: str, entries: list[str]) -> None:
        self.trt_version = trt_version
        self.entries = entries

    def serialize(self) -> IHostMemory:
        """The cache's bytes, for writing to a file."""
        return IHostMemory(encode_timing_cache(self.trt_version, self.entries))


class IBuilderConfig:
    """Workspace limit, profiles, timing cache, optimization level."""

    def __init__(self, ctx: TrtContext, logger: ILogger) -> None:
        self._ctx, self._logger = ctx, logger
        self.pools: dict[MemoryPoolType, int] = {}
        self.profiles: list[IOptimizationProfile] = []
        self.timing_cache: ITimingCache | None = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
        """Cap a memory pool (WORKSPACE)."""
        self.pools[MemoryPoolType(pool)] = operator.index(pool_size)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        """Add a profile; its index."""
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: Any) -> ITimingCache:
        """A timing cache from bytes (b"" for a new one); unreadable bytes give an empty cache, with a warning."""
        data = bytes(memoryview(serialized_timing_cache))
        version = self._ctx.state.trt_version
        if not data:
            return ITimingCache(version, [])
        try:
            cache_version, entries = decode_timing_cache(data)
        except PlanError as error:
            self._ctx.log(self._logger, ILogger.Severity.WARNING, f"ignoring invalid timing cache: {error}")
            return ITimingCache(version, [])
        return ITimingCache(cache_version, entries)

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        """Use `cache`; False (logged) for a cache of another TensorRT version unless `ignore_mismatch`."""
        if cache.trt_version != self._ctx.state.trt_version and not ignore_mismatch:
            self._ctx.error(
                self._logger, f"timing cache from TensorRT {cache.trt_version}, this is {self._ctx.state.trt_version}"
            )
            return False
        if cache.trt_version != self._ctx.state.trt_version:
            cache = ITimingCache(self._ctx.state.trt_version, [])
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache | None:
        """The cache in use (updated by builds), or None if none was set."""
        return self.timing_cache


class ParserError:
    """One error the ONNX parser found."""

    def __init__(self, desc: str, node: int = -1) -> None:
        self._desc, self._node = desc, node

    def desc(self) -> str:
        """What went wrong."""
        return self._desc

    def node(self) -> int:
        """The failing node's index, -1 if none."""
        return self._node

    def __str__(self) -> str:
        return f"In node {self._node}: {self._desc}"


class OnnxParser:
    """Fills a network from an ONNX model."""

    _ctx: ClassVar[TrtContext]

    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None:
        self._network = network
        self._logger = logger
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        """Errors from the last parse."""
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        """Error `index` of the last parse."""
        return self._errors[index]

    def _error(self, message: str) -> bool:
        self._errors.append(ParserError(message))
        self._ctx.error(self._logger, f"ModelImporter: {message}")
        return False

    def parse(self, model: Any, path: str | None = None) -> bool:
        """Parse ONNX bytes into the network; False with errors recorded on failure."""
        from tests.support.gpu_simulator.tensorrt import session_for

        state = self._ctx.state
        with state.lock:
            self._errors.clear()
            if state.take_failure("parse") is not None:
                return self._error("injected parse failure")
            data = bytes(memoryview(model))
            try:
                session = session_for(data)
            except Exception as error:  # whatever ONNX Runtime rejects, the parser rejects
                return self._error(f"failed to parse ONNX model{f' {path}' if path else ''}: {error}")
            inputs: list[ITensor] = []
            outputs: list[ITensor] = []
            for args, tensors in ((session.get_inputs(), inputs), (session.get_outputs(), outputs)):
                for arg in args:
                    dtype = ORT_TYPES.get(arg.type)
                    if dtype is None:
                        self._error(f"tensor {arg.name!r} has type {arg.type}, which TensorRT I/O cannot carry")
                        continue
                    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
                    tensors.append(ITensor(arg.name, shape, dtype))
            if self._errors:
                return False
            graph_name = session.get_modelmeta().graph_name
            self._network.onnx_bytes = data
            self._network.name = graph_name or "network"
            self._network.inputs, self._network.outputs = inputs, outputs
            return True

    def parse_from_file(self, model: str) -> bool:
        """Parse an ONNX file."""
        try:
            data = Path(model).read_bytes()
        except OSError as error:
            self._errors = []
            return self._error(f"cannot read {model}: {error}")
        return self.parse(data, model)


class Builder:
    """Builds serialized plans for the current device."""

    _ctx: ClassVar[TrtContext]

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger

    def create_network(self, flags: int = 0) -> INetworkDefinition:
        """An empty network."""
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        """A builder config with TensorRT's defaults."""
        return IBuilderConfig(self._ctx, self._logger)

    def create_optimization_profile(self) -> IOptimizationProfile:
        """An empty optimization profile."""
        return IOptimizationProfile()

    def _fail(self, message: str) -> None:
        self._ctx.error(self._logger, message)

    def _profiles(self, network: INetworkDefinition, config: IBuilderConfig) -> list[Profile] | None:
        dynamic = [t.name for t in network.inputs if -1 in t._shape]
        if dynamic and not config.profiles:
            self._fail(
                "Network has dynamic or shape inputs, but no optimization profile has been defined "
                f"(dynamic inputs: {dynamic})."
            )
            return None
        names = {t.name for t in network.inputs}
        built: list[Profile] = []
        for index, profile in enumerate(config.profiles or [IOptimizationProfile()]):
            unknown = sorted(set(profile.shapes) - names)
            if unknown:
                self._fail(f"optimization profile {index} names inputs the network does not have: {unknown}")
                return None
            shapes: Profile = {}
            for tensor in network.inputs:
                found = profile.shapes.get(tensor.name)
                if found is None:
                    if tensor.name in dynamic:
                        self._fail(f"optimization profile {index} has no shapes for dynamic input {tensor.name!r}")
                        return None
                    found = (tensor._shape, tensor._shape, tensor._shape)
                problem = _profile_problem(tensor._shape, found)
                if problem:
                    self._fail(f"optimization profile {index}, input {tensor.name!r}: {problem}")
                    return None
                shapes[tensor.name] = found
            built.append(shapes)
        return built

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None:
        """The plan for `network`, or None (logged) when it cannot be built."""
        state = self._ctx.state
        with state.lock:
            if state.take_failure("build_serialized_network") is not None:
                self._fail("build_serialized_network: injected failure")
                return None
            if network.onnx_bytes is None:
                self._fail("build_serialized_network: the network is empty (nothing was parsed)")
                return None
            profiles = self._profiles(network, config)
            if profiles is None:
                return None
            info = state.device_info(state.current_device)
            if info is None:
                self._fail("build_serialized_network: no CUDA device")
                return None
            header = PlanHeader(
                trt_version=state.trt_version,
                device_name=info.name,
                compute_capability=info.compute_capability,
                name=network.name,
                inputs=tuple(PlanTensor(t.name, t.dtype.name, t._shape) for t in network.inputs),
                outputs=tuple(PlanTensor(t.name, t.dtype.name, t._shape) for t in network.outputs),
                profiles=tuple(profiles),
                builder={
                    "flags": int(network.flags),
                    "pools": {pool.name: size for pool, size in config.pools.items()},
                    "optimization_level": config.builder_optimization_level,
                    "timing_cache_hit": False,
                },
            )
            cache = config.timing_cache
            if cache is not None:
                # What a real build adds to the timing cache: timings keyed by the layers it tuned.
                profile_json = json.dumps([{k: list(v) for k, v in p.items()} for p in profiles], sort_keys=True)
                entry = hashlib.sha256(network.onnx_bytes + profile_json.encode()).hexdigest()
                header.builder["timing_cache_hit"] = entry in cache.entries
                if entry not in cache.entries:
                    cache.entries.append(entry)
            return IHostMemory(encode_plan(header, network.onnx_bytes))


def _profile_problem(shape: Shape, profile: tuple[Shape, Shape, Shape]) -> str | None:
    low, opt, high = profile
    if not len(low) == len(opt) == len(high) == len(shape):
        return f"min/opt/max {low}/{opt}/{high} do not have the input's rank {len(shape)} (shape {shape})"
    for axis, (dim, lo, op, hi) in enumerate(zip(shape, low, opt, high, strict=True)):
        if dim >= 0 and not lo == op == hi == dim:
            return f"dimension {axis} is static ({dim}) but the profile gives {lo}/{op}/{hi}"
        if not 0 <= lo <= op <= hi:
            return f"dimension {axis}: need 0 <= min <= opt <= max, got {lo}/{op}/{hi}"
    return None
