"""The fake `tensorrt` module's runtime side: Runtime, ICudaEngine, IExecutionContext (name-based I/O API).

Execution follows TensorRT's contract: `execute_async_v3` snapshots the context's input shapes and tensor addresses
when it is called and queues the inference on the stream; when the stream runs (see streams.py) the inputs are read
from simulated device memory, ONNX Runtime runs the ONNX model carried in the plan, and the outputs are written back
to device memory. Calls that fail return False/None and log an error through the caller's logger, as TensorRT does.
"""

from __future__ import annotations

import math
import operator
import types
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from tests.support.gpu_simulator import builder
from tests.support.gpu_simulator.core import Fault
from tests.support.gpu_simulator.plans import PlanError, PlanHeader, PlanTensor, decode_plan
from tests.support.gpu_simulator.streams import Node
from tests.support.gpu_simulator.trt_types import (
    NUMPY_DTYPES,
    DataType,
    Dims,
    ExecutionContextAllocationStrategy,
    IHostMemory,
    ILogger,
    Logger,
    MemoryPoolType,
    NetworkDefinitionCreationFlag,
    TensorIOMode,
    TrtContext,
)

__all__ = ["ICudaEngine", "IExecutionContext", "Runtime", "build_module", "session_for"]

Shapes = dict[str, tuple[int, ...]]


def session_for(onnx_bytes: bytes) -> ort.InferenceSession:
    """A small single-threaded CPU ONNX Runtime session (what "the GPU" computes with)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _nbytes(tensor: PlanTensor, shape: Sequence[int]) -> int:
    return math.prod(shape) * NUMPY_DTYPES[DataType[tensor.dtype]].itemsize


class ICudaEngine:
    """A deserialized plan on the device that was current when it was deserialized."""

    def __init__(self, ctx: TrtContext, logger: ILogger, header: PlanHeader, onnx_bytes: bytes, plan: bytes) -> None:
        self._ctx = ctx
        self._logger = logger
        self._header = header
        self._plan = plan
        self.device = ctx.state.current_device
        self.session = session_for(onnx_bytes)
        self.inputs = {t.name: t for t in header.inputs}
        self.outputs = {t.name: t for t in header.outputs}
        self._order = [t.name for t in (*header.inputs, *header.outputs)]
        self._output_shapes: dict[tuple[tuple[str, tuple[int, ...]], ...], Shapes] = {}
        ctx.state.created("engine")
        self._finalizer = weakref.finalize(self, ctx.state.destroyed, "engine")

    def __del__(self) -> None:
        self._finalizer()

    @property
    def num_io_tensors(self) -> int:
        """Inputs and outputs together."""
        return len(self._order)

    @property
    def num_optimization_profiles(self) -> int:
        """How many optimization profiles the plan was built with."""
        return len(self._header.profiles)

    @property
    def name(self) -> str:
        """The network's name."""
        return self._header.name

    def _tensor(self, name: str, call: str) -> PlanTensor | None:
        found = self.inputs.get(name) or self.outputs.get(name)
        if found is None:
            self._ctx.error(self._logger, f"{call}: no tensor named {name!r}")
            self._ctx.state.record_misuse(f"ICudaEngine.{call}({name!r}): unknown tensor name")
        return found

    def get_tensor_name(self, index: int) -> str:
        """The name of I/O tensor `index` (inputs first, then outputs)."""
        return self._order[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        """INPUT, OUTPUT, or NONE for a name that is neither."""
        if name in self.inputs:
            return TensorIOMode.INPUT
        if name in self.outputs:
            return TensorIOMode.OUTPUT
        return TensorIOMode.NONE

    def get_tensor_dtype(self, name: str) -> DataType:
        """The tensor's element type."""
        tensor = self._tensor(name, "get_tensor_dtype")
        return DataType.FLOAT if tensor is None else DataType[tensor.dtype]

    def get_tensor_shape(self, name: str) -> Dims:
        """The tensor's shape with -1 for dynamic dimensions."""
        tensor = self._tensor(name, "get_tensor_shape")
        return Dims(() if tensor is None else tensor.shape)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        """[min, opt, max] of an input in a profile."""
        if name not in self.inputs or not 0 <= profile_index < len(self._header.profiles):
            self._ctx.error(self._logger, f"get_tensor_profile_shape({name!r}, {profile_index}): no such input")
            self._ctx.state.record_misuse(f"get_tensor_profile_shape({name!r}, {profile_index}): no such input")
            return []
        return [Dims(shape) for shape in self._header.profiles[profile_index][name]]

    def create_execution_context(
        self, strategy: ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy.STATIC
    ) -> IExecutionContext | None:
        """A new execution context, or None (logged) on failure."""
        with self._ctx.state.lock:
            if self._ctx.state.take_failure("create_execution_context") is not None:
                self._ctx.error(self._logger, "create_execution_context: out of device memory (injected)")
                return None
            return IExecutionContext(self._ctx, self, self._logger)

    def serialize(self) -> IHostMemory:
        """The plan this engine was deserialized from."""
        return IHostMemory(self._plan)

    def profile(self, index: int) -> Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Simulator helper: profile `index` as (min, opt, max) per input."""
        return self._header.profiles[index]

    def output_shapes(self, shapes: Shapes) -> Shapes:
        """The output shapes for these input shapes: ONNX Runtime run once on zeros, cached per input shapes."""
        key = tuple(sorted(shapes.items()))
        cached = self._output_shapes.get(key)
        if cached is None:
            feeds = {name: np.zeros(shape, NUMPY_DTYPES[DataType[self.inputs[name].dtype]]) for name, shape in key}
            cached = {name: tuple(value.shape) for name, value in self.run(feeds).items()}
            self._output_shapes[key] = cached
        return cached

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Compute the outputs for `feeds` with ONNX Runtime."""
        names = list(self.outputs)
        results = self.session.run(names, dict(feeds))
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}


class IExecutionContext:
    """Input shapes and tensor addresses for one engine, and execution on a stream."""

    def __init__(self, ctx: TrtContext, engine: ICudaEngine, logger: ILogger) -> None:
        self._ctx = ctx
        self._engine = engine  # keeps the engine alive, as TensorRT's Python bindings do
        self._logger = logger
        self._profile = 0
        self._shapes: Shapes = {}
        self._addresses: dict[str, int] = {}
        # Input shape combinations enqueued outside capture: TensorRT must see a shape once before it is captured.
        self._enqueued: set[tuple[tuple[str, tuple[int, ...]], ...]] = set()
        self._destroyed = False
        ctx.state.created("context")
        self._finalizer = weakref.finalize(self, ctx.state.destroyed, "context")

    def __del__(self) -> None:
        self._destroyed = True
        self._finalizer()

    def _fail(self, message: str, *, misuse: bool = True) -> bool:
        self._ctx.error(self._logger, message)
        if misuse:
            self._ctx.state.record_misuse(message)
        return False

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        """Set an input's shape for the next execution; False (logged) if it is not an input or not in the profile."""
        with self._ctx.state.lock:
            if self._ctx.state.take_failure("set_input_shape") is not None:
                return self._fail(f"set_input_shape({name!r}): injected failure", misuse=False)
            tensor = self._engine.inputs.get(name)
            if tensor is None:
                return self._fail(f"set_input_shape({name!r}): not an input tensor")
            dims = tuple(operator.index(d) for d in shape)
            low, _, high = self._engine.profile(self._profile)[tensor.name]
            if len(dims) != len(tensor.shape) or any(
                not lo <= d <= hi for d, lo, hi in zip(dims, low, high, strict=True)
            ):
                return self._fail(
                    f"shape outside profile: set_input_shape({name!r}, {dims}) is outside profile {self._profile} "
                    f"(min {low}, max {high})"
                )
            self._shapes[name] = dims
            return True

    def get_tensor_shape(self, name: str) -> Dims:
        """An input's set shape, or an output's shape given the set input shapes (-1 where still unknown)."""
        with self._ctx.state.lock:
            if name in self._engine.inputs:
                return Dims(self._shapes.get(name, self._engine.inputs[name].shape))
            if name in self._engine.outputs:
                if not self.all_binding_shapes_specified:
                    return Dims(self._engine.outputs[name].shape)
                return Dims(self._engine.output_shapes(self._shapes)[name])
            self._fail(f"get_tensor_shape({name!r}): no such tensor")
            return Dims(())

    def set_tensor_address(self, name: str, memory: int) -> bool:
        """Bind a tensor to a device address; False (logged) for an unknown name."""
        with self._ctx.state.lock:
            if self._ctx.state.take_failure("set_tensor_address") is not None:
                return self._fail(f"set_tensor_address({name!r}): injected failure", misuse=False)
            if name not in self._engine.inputs and name not in self._engine.outputs:
                return self._fail(f"set_tensor_address({name!r}): no such tensor")
            self._addresses[name] = operator.index(memory)
            return True

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        """Select an optimization profile; False (logged) for an index the engine does not have."""
        with self._ctx.state.lock:
            if not 0 <= profile_index < self._engine.num_optimization_profiles:
                return self._fail(f"set_optimization_profile_async({profile_index}): no such profile")
            self._profile = profile_index
            self._shapes.clear()
            return True

    @property
    def all_binding_shapes_specified(self) -> bool:
        """Whether every input has a shape."""
        return all(name in self._shapes for name in self._engine.inputs)

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Queue inference on the stream with the shapes and addresses set now; False (logged) on failure."""
        if not isinstance(stream_handle, int) or isinstance(stream_handle, bool):
            # TensorRT's binding takes the integer handle: int(stream), not the cudaStream_t object.
            raise TypeError(f"execute_async_v3(): stream_handle must be an int, got {type(stream_handle).__name__}")
        state = self._ctx.state
        with state.lock:
            if state.take_failure("execute_async_v3") is not None:
                return self._fail("execute_async_v3: enqueue failed (injected)", misuse=False)
            if self._destroyed:
                return self._fail("execute_async_v3 on a destroyed execution context")
            stream = self._ctx.cudart.resolve_stream(stream_handle, "execute_async_v3")
            if isinstance(stream, str):
                return self._fail(stream)
            engine = self._engine
            if stream.device != engine.device:
                return self._fail(
                    f"execute_async_v3: engine on device {engine.device}, stream on device {stream.device}"
                )
            missing = [name for name in engine.inputs if name not in self._shapes]
            if missing:
                return self._fail(f"execute_async_v3: input shape not set for {missing}")
            unbound = [name for name in (*engine.inputs, *engine.outputs) if name not in self._addresses]
            if unbound:
                return self._fail(f"execute_async_v3: tensor address not set for {unbound}")
            shapes = dict(self._shapes)
            key = tuple(sorted(shapes.items()))
            if stream.capture is not None and key not in self._enqueued:
                return self._fail(
                    f"execute_async_v3 captured for input shapes {shapes} never enqueued before: TensorRT needs "
                    "one uncaptured execute_async_v3 after an input shape change before graph capture"
                )
            out_shapes = engine.output_shapes(shapes)
            addresses = dict(self._addresses)
            tensors = {**engine.inputs, **engine.outputs}
            all_shapes = {**shapes, **out_shapes}
            try:
                self._check_addresses(tensors, all_shapes, addresses, "execute_async_v3")
            except Fault as fault:
                return self._fail(str(fault))
            if stream.capture is None:
                self._enqueued.add(key)

            def execute() -> None:
                self._check_addresses(tensors, all_shapes, addresses, f"executing {engine.name}")
                memory = self._ctx.memory
                feeds = {}
                for name, tensor in engine.inputs.items():
                    data = memory.read(addresses[name], _nbytes(tensor, shapes[name]), f"input {name!r}")
                    feeds[name] = np.frombuffer(data, NUMPY_DTYPES[DataType[tensor.dtype]]).reshape(shapes[name])
                try:
                    results = engine.run(feeds)
                except Exception as error:  # ONNX Runtime's own errors: the "kernel" failed
                    raise Fault(f"executing {engine.name}: {error}") from error
                for name, tensor in engine.outputs.items():
                    value = np.ascontiguousarray(results[name], NUMPY_DTYPES[DataType[tensor.dtype]])
                    memory.write(addresses[name], value.tobytes(), f"output {name!r}")

            label = f"execute {engine.name} " + ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
            node = Node("execute", label, state.costs.execute_us, execute)
            self._ctx.scheduler.enqueue(stream, [node], kind="execute", label=label)
            return True

    def _check_addresses(
        self, tensors: Mapping[str, PlanTensor], shapes: Shapes, addresses: Mapping[str, int], what: str
    ) -> None:
        for name, tensor in tensors.items():
            size = _nbytes(tensor, shapes[name])
            alloc = self._ctx.memory.device_allocation(addresses[name], size, f"{what}: tensor {name!r}")
            if alloc.device != self._engine.device:
                raise Fault(f"{what}: tensor {name!r} is on device {alloc.device}, engine on {self._engine.device}")


class Runtime:
    """Deserializes plans: None (logged) for another TensorRT version or device, or bytes that are not a plan."""

    _ctx: ClassVar[TrtContext]

    def __init__(self, logger: ILogger) -> None:
        self._logger = logger

    def deserialize_cuda_engine(self, serialized_engine: Any) -> ICudaEngine | None:
        """The engine in `serialized_engine`, on the current device."""
        ctx = self._ctx
        with ctx.state.lock:
            data = bytes(memoryview(serialized_engine))
            if ctx.state.take_failure("deserialize_cuda_engine") is not None:
                ctx.error(self._logger, "deserialize_cuda_engine: injected failure")
                return None
            try:
                header, onnx_bytes = decode_plan(data)
            except PlanError as error:
                ctx.error(self._logger, f"1: [runtime.cpp::deserializeCudaEngine] Serialization failed: {error}")
                return None
            if header.trt_version != ctx.state.trt_version:
                ctx.error(
                    self._logger,
                    "The engine plan file is not compatible with this version of TensorRT, expecting library "
                    f"version {ctx.state.trt_version} got {header.trt_version}, please rebuild.",
                )
                return None
            info = ctx.state.device_info(ctx.state.current_device)
            if info is None or (info.name, info.compute_capability) != (header.device_name, header.compute_capability):
                ctx.error(
                    self._logger,
                    f"The engine plan file was built for {header.device_name} (compute capability "
                    f"{header.compute_capability}), not this device: please rebuild.",
                )
                return None
            try:
                return ICudaEngine(ctx, self._logger, header, onnx_bytes, data)
            except Exception as error:  # the embedded model does not load
                ctx.error(self._logger, f"deserialize_cuda_engine: {error}")
                return None


def build_module(ctx: TrtContext) -> types.ModuleType:
    """A module object standing in for `tensorrt`, bound to one simulator."""
    module = types.ModuleType("tensorrt", "Simulated TensorRT (tests only).")
    bound = {"_ctx": ctx}
    exported: dict[str, Any] = {
        "__version__": ctx.state.trt_version,
        "DataType": DataType,
        "TensorIOMode": TensorIOMode,
        "MemoryPoolType": MemoryPoolType,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "ExecutionContextAllocationStrategy": ExecutionContextAllocationStrategy,
        "Dims": Dims,
        "ILogger": ILogger,
        "Logger": Logger,
        "IHostMemory": IHostMemory,
        "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext,
        "Runtime": type("Runtime", (Runtime,), bound),
        "ITensor": builder.ITensor,
        "INetworkDefinition": builder.INetworkDefinition,
        "IOptimizationProfile": builder.IOptimizationProfile,
        "ITimingCache": builder.ITimingCache,
        "IBuilderConfig": builder.IBuilderConfig,
        "Builder": type("Builder", (builder.Builder,), bound),
        "ParserError": builder.ParserError,
        "OnnxParser": type("OnnxParser", (builder.OnnxParser,), bound),
    }
    for name, value in exported.items():
        setattr(module, name, value)
    return module
