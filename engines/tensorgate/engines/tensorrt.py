"""The TensorRT engine: serialized plans run on CUDA streams, with copies of one batch overlapping compute of another.

Layout: one TensorRT execution context per instance_group instance, on its own GPU, each with three non-blocking
streams (compute, host-to-device copies, device-to-host copies) and `pipeline_depth` slots. A slot is everything
one batch in flight needs: page-locked host buffers and device buffers for every tensor, sized for the
optimization profile's largest shapes and allocated once at load, and three events. The batcher sees
contexts x depth instances; instance i runs on context i % contexts, slot i // contexts, so a lightly loaded
model spreads over its GPUs first.

One batch on slot s of context c: copy the inputs into s's pinned buffers; queue the H2D copies on c's copy stream
and record `h2d_done`; make the compute stream wait for it, set the input shapes and tensor addresses and queue
`execute_async_v3` (or launch the CUDA graph captured for these shapes); record `compute_done`; make the D2H
stream wait for it, queue the D2H copies of the wanted outputs and record `d2h_done`. All of that is queued from
c's enqueue thread and never blocks. c's completion thread waits on `d2h_done` and hands copies of the outputs to
the event loop with `call_soon_threadsafe`. Because the three streams only meet at events, slot 1's H2D copy runs
while slot 0 computes, and slot 0's D2H copy while slot 1 computes.

Every cudart result and every TensorRT status is checked; a failure fails that batch with an EngineError naming
the call, and the engine keeps serving. `tensorrt` and `cuda.bindings.runtime` are imported in `load()`, so the
module imports anywhere. A missing library or GPU, and a plan that is missing, unreadable, rejected by this
TensorRT or GPU, or cannot be built, are EngineUnavailableError (the fallback chain's cue); a bad parameter, a
GPU index that does not exist or a CUDA failure (out of memory) are plain EngineErrors: the model fails to load
rather than quietly moving to ONNX Runtime.

Parameters (config.pbtxt `parameters`): `pipeline_depth` (batches in flight per context, default 2),
`cuda_graphs` ("true" captures one graph per slot and input shapes after a first normal run; default "false"),
`plan_build` ("never", the default, or "on_load": when model.plan is missing or rejected and model.onnx is beside
it, build the plan through tensorgate.engines.plans, cached, for batches up to the settings' `max_batch_size`)
and, for such builds, the `plan_*` parameters plans.build_settings_from_parameters reads.

All contexts use optimization profile 0 (TensorRT 8 and later let several contexts share a profile).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import numpy.typing as npt

from tensorgate.engines import plans
from tensorgate.engines.base import (
    Arrays,
    EngineError,
    EngineInputError,
    EngineSettings,
    EngineUnavailableError,
    TensorSpec,
)
from tensorgate.engines.cuda import (
    CudaError,
    CudaRuntime,
    DeviceBuffer,
    Event,
    Graph,
    GraphExec,
    PinnedBuffer,
    Stream,
)
from tensorgate.engines.threads import InstanceThread, reject, resolve, settle

if TYPE_CHECKING:
    import tensorrt

__all__ = ["DEFAULT_PIPELINE_DEPTH", "TensorRTEngine"]

log = logging.getLogger(__name__)

#: Batches in flight per execution context when the config does not say: one copying while one computes.
DEFAULT_PIPELINE_DEPTH = 2
# Graphs kept per slot: one per distinct set of input shapes, so a model with several free dimensions cannot
# grow them without bound; shapes beyond this run without a graph.
_MAX_GRAPHS_PER_SLOT = 256
_ONNX_FILENAME = "model.onnx"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

Shapes = tuple[tuple[int, ...], ...]


@dataclass(slots=True)
class _Tensor:
    """What the engine knows of one I/O tensor."""

    name: str
    dtype: np.dtype[Any]
    is_input: bool
    # The largest shape it takes or gives within profile 0 (outputs: at the profile's max input shapes).
    max_shape: tuple[int, ...] = ()

    @property
    def max_bytes(self) -> int:
        return int(np.prod(self.max_shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(slots=True)
class _Graph:
    """A CUDA graph of one execute_async_v3 at fixed shapes and addresses, and the output shapes it gives."""

    graph: Graph
    exec: GraphExec
    output_shapes: dict[str, tuple[int, ...]]


@dataclass(slots=True)
class _Slot:
    """The buffers and events of one batch in flight."""

    index: int
    host_in: dict[str, PinnedBuffer] = field(default_factory=dict)
    dev_in: dict[str, DeviceBuffer] = field(default_factory=dict)
    dev_out: dict[str, DeviceBuffer] = field(default_factory=dict)
    host_out: dict[str, PinnedBuffer] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)  # h2d_done, compute_done, d2h_done once created
    graphs: dict[Shapes, _Graph] = field(default_factory=dict)
    # Shapes whose capture failed: they run without a graph from then on.
    no_graph: set[Shapes] = field(default_factory=set)
    # Whether a batch ever ran on it (its events have been recorded).
    used: bool = False

    @property
    def h2d_done(self) -> Event:
        return self.events[0]

    @property
    def compute_done(self) -> Event:
        return self.events[1]

    @property
    def d2h_done(self) -> Event:
        return self.events[2]


@dataclass(slots=True)
class _Context:
    """One execution context on one GPU, its streams and slots, and its two threads."""

    index: int
    device: int
    enqueuer: InstanceThread
    completer: InstanceThread
    context: tensorrt.IExecutionContext | None = None
    streams: list[Stream] = field(default_factory=list)  # compute, h2d, d2h once created
    slots: list[_Slot] = field(default_factory=list)

    @property
    def compute(self) -> Stream:
        return self.streams[0]

    @property
    def h2d(self) -> Stream:
        return self.streams[1]

    @property
    def d2h(self) -> Stream:
        return self.streams[2]


def _flag(parameters: Mapping[str, str], key: str, default: bool) -> bool:
    text = parameters.get(key)
    if text is None:
        return default
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise EngineError(f"parameter {key!r} must be true or false, got {text!r}")


def _shape(dims: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(dim) for dim in dims)


def _nbytes(dtype: np.dtype[Any], shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class TensorRTEngine:
    """Serves a TensorRT plan (`model.plan`) on CUDA streams; see the module docstring for the pipeline."""

    def __init__(self, settings: EngineSettings) -> None:
        if settings.instance_count < 1:
            raise EngineError(f"instance_count must be at least 1, got {settings.instance_count}")
        parameters = settings.parameters
        try:
            depth = int(parameters.get("pipeline_depth", str(DEFAULT_PIPELINE_DEPTH)))
        except ValueError:
            raise EngineError(
                f"parameter 'pipeline_depth' must be an integer, got {parameters['pipeline_depth']!r}"
            ) from None
        if depth < 1:
            raise EngineError(f"parameter 'pipeline_depth' must be at least 1, got {depth}")
        build = parameters.get("plan_build", "never")
        if build not in ("never", "on_load"):
            raise EngineError(f"parameter 'plan_build' must be 'never' or 'on_load', got {build!r}")
        if settings.devices and len(settings.devices) != settings.instance_count:
            raise EngineError(
                f"{len(settings.devices)} GPUs are given for {settings.instance_count} instances; give one per instance"
            )
        self._settings = settings
        self._depth = depth
        self._graphs = _flag(parameters, "cuda_graphs", False)
        self._build_on_load = build == "on_load"
        self._cuda: CudaRuntime | None = None
        self._trt: ModuleType | None = None
        self._runtime_class: type[tensorrt.Runtime] | None = None
        self._input_mode: tensorrt.TensorIOMode | None = None
        self._logger: tensorrt.ILogger | None = None
        self._trt_errors: collections.deque[str] = collections.deque()
        self._runtimes: dict[int, tensorrt.Runtime] = {}
        self._engines: dict[int, tensorrt.ICudaEngine] = {}
        self._plan: bytes | None = None
        self._dtypes: dict[Any, np.dtype[Any]] = {}
        self._tensors: list[_Tensor] = []
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
        self._contexts: list[_Context] = []
        self._version = ""
        self._gpus: dict[int, str] = {}
        self._loaded = False

    # The Engine protocol ---------------------------------------------------------------------------------------

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        """The plan's inputs, with their optimization profile's min and max shapes."""
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        """The plan's outputs."""
        return self._outputs

    @property
    def instance_count(self) -> int:
        """Batches that may run at once: execution contexts x pipeline depth."""
        return self._settings.instance_count * self._depth

    @property
    def description(self) -> str:
        """E.g. "tensorrt 10.13.0 (NVIDIA H100, sm_90; 2 contexts x depth 2, cuda graphs off)"."""
        if not self._loaded:
            return "tensorrt (not loaded)"
        gpus = "; ".join(dict.fromkeys(self._gpus[ctx.device] for ctx in self._contexts))
        count = len(self._contexts)
        return (
            f"tensorrt {self._version} ({gpus}; {count} context{'s' if count != 1 else ''} x depth {self._depth}, "
            f"cuda graphs {'on' if self._graphs else 'off'})"
        )

    async def load(self) -> None:
        """Import TensorRT and CUDA, deserialize (or build) the plan on every GPU used, and create every context,
        stream, event and buffer. EngineUnavailableError when TensorRT, cuda-python or a GPU is missing."""
        try:
            await self._load()
        except BaseException:
            await self.close()
            raise

    async def _load(self) -> None:
        path = self._settings.model_file
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except Exception as exc:  # ImportError, or OSError from a library that is there but cannot load
            raise EngineUnavailableError(f"TensorRT cannot run here: {exc}") from exc
        cuda = self._cuda = CudaRuntime(cudart)
        self._trt = trt
        self._runtime_class = trt.Runtime
        self._input_mode = trt.TensorIOMode.INPUT
        self._version = str(trt.__version__)
        count = cuda.device_count()
        if count == 0:
            raise EngineUnavailableError("TensorRT cannot run here: CUDA sees no GPU (or no driver)")
        devices = self._settings.devices or (0,) * self._settings.instance_count
        for device in devices:
            if not 0 <= device < count:
                raise EngineError(f"GPU {device} is configured, but CUDA sees only {count} (0 to {count - 1})")
        self._dtypes = {
            trt.DataType.FLOAT: np.dtype(np.float32),
            trt.DataType.HALF: np.dtype(np.float16),
            trt.DataType.BF16: np.dtype(ml_dtypes.bfloat16),
            trt.DataType.INT8: np.dtype(np.int8),
            trt.DataType.UINT8: np.dtype(np.uint8),
            trt.DataType.INT32: np.dtype(np.int32),
            trt.DataType.INT64: np.dtype(np.int64),
            trt.DataType.BOOL: np.dtype(np.bool_),
        }
        if path.is_file():
            try:
                self._plan = await asyncio.to_thread(path.read_bytes)  # plans run to hundreds of MB
            except OSError as exc:
                raise EngineUnavailableError(f"{path}: the plan cannot be read: {exc}") from exc
        elif not self._can_build():
            raise EngineUnavailableError(
                f"{path}: no such plan file (build one with `tensorgate build-engine`, or set the parameter "
                f'plan_build: "on_load" with a {_ONNX_FILENAME} beside it)'
            )
        self._logger, self._trt_errors = plans.trt_logger(trt)
        stem = f"{path.parent.parent.name}-v{path.parent.name}"
        for index, device in enumerate(devices):
            ctx = _Context(
                index, device, InstanceThread(f"trt-{stem}-{index}"), InstanceThread(f"trt-{stem}-{index}-done")
            )
            self._contexts.append(ctx)
            try:
                await ctx.completer.run(functools.partial(cuda.set_device, device))
                await ctx.enqueuer.run(functools.partial(self._setup_context, ctx))
            except EngineError:
                raise
            except Exception as exc:  # what TensorRT's bindings raise for bad arguments
                raise _engine_error(exc) from exc
        self._inputs = tuple(
            TensorSpec(t.name, t.dtype, self._spec_shape(t.name), self._profile[t.name][0], self._profile[t.name][2])
            for t in self._tensors
            if t.is_input
        )
        self._outputs = tuple(
            TensorSpec(t.name, t.dtype, self._spec_shape(t.name)) for t in self._tensors if not t.is_input
        )
        self._loaded = True

    def _can_build(self) -> bool:
        return self._build_on_load and self._settings.model_file.with_name(_ONNX_FILENAME).is_file()

    def _spec_shape(self, name: str) -> tuple[int, ...]:
        engine = next(iter(self._engines.values()))
        return _shape(engine.get_tensor_shape(name))

    # Loading, on each context's enqueue thread -------------------------------------------------------------------

    def _last_trt_error(self) -> str:
        return f" (TensorRT: {self._trt_errors[-1]})" if self._trt_errors else ""

    def _engine_for(self, device: int) -> tensorrt.ICudaEngine:
        """The engine deserialized on `device` (the current device of the calling thread), made once per GPU."""
        if device in self._engines:
            return self._engines[device]
        assert self._cuda is not None
        assert self._logger is not None
        assert self._runtime_class is not None
        path = self._settings.model_file
        self._gpus[device] = (
            f"{self._cuda.device_name(device)}, sm_{''.join(map(str, self._cuda.compute_capability(device)))}"
        )
        runtime = self._runtimes[device] = self._runtime_class(self._logger)
        engine = runtime.deserialize_cuda_engine(self._plan) if self._plan is not None else None
        if engine is None and self._can_build():
            if self._plan is not None:
                log.warning("TensorRT %s rejected %s; building a plan from %s", self._version, path, _ONNX_FILENAME)
            try:
                engine = self._build(runtime, device)
            except EngineUnavailableError:
                raise
            except EngineError as exc:  # the ONNX model may still serve, on ONNX Runtime
                raise EngineUnavailableError(f"no TensorRT plan could be built: {exc}") from exc
        if engine is None:
            raise EngineUnavailableError(
                f"{path}: TensorRT {self._version} cannot deserialize this plan on GPU {device} "
                f"({self._gpus[device]}): deserialize_cuda_engine returned None{self._last_trt_error()}. Plans only "
                "load on the TensorRT version and GPU model they were built with: rebuild it with "
                f'`tensorgate build-engine`, or set the parameter plan_build: "on_load" with a {_ONNX_FILENAME} '
                "beside it"
            )
        self._engines[device] = engine
        if not self._tensors:
            self._read_tensors(engine)
        return engine

    def _build(self, runtime: tensorrt.Runtime, device: int) -> tensorrt.ICudaEngine:
        assert self._cuda is not None
        assert self._trt is not None
        settings = plans.build_settings_from_parameters(self._settings.parameters, self._settings.max_batch_size)
        return plans.load_or_build(
            self._trt,
            runtime,
            self._settings.model_file.with_name(_ONNX_FILENAME),
            settings,
            plans.PlanCache(self._settings.plan_cache_dir),
            device_name=self._cuda.device_name(device),
            compute_capability=self._cuda.compute_capability(device),
        )

    def _read_tensors(self, engine: tensorrt.ICudaEngine) -> None:
        """I/O names, directions, dtypes and profile-0 shapes, through the name-based API."""
        assert self._input_mode is not None
        path = self._settings.model_file
        input_mode = self._input_mode
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            trt_dtype = engine.get_tensor_dtype(name)
            dtype = self._dtypes.get(trt_dtype)
            if dtype is None:
                raise EngineError(
                    f"{path}: tensor {name!r} is {getattr(trt_dtype, 'name', trt_dtype)}, which tensorgate cannot "
                    f"carry (it serves {', '.join(sorted(getattr(d, 'name', str(d)) for d in self._dtypes))})"
                )
            is_input = engine.get_tensor_mode(name) == input_mode
            tensor = _Tensor(name, dtype, is_input)
            if is_input:
                shape = _shape(engine.get_tensor_shape(name))
                if all(dim >= 0 for dim in shape):
                    low = opt = high = shape
                else:
                    low, opt, high = (_shape(dims) for dims in engine.get_tensor_profile_shape(name, 0))
                self._profile[name] = (low, opt, high)
                tensor.max_shape = high
            self._tensors.append(tensor)

    def _setup_context(self, ctx: _Context) -> None:
        """Create the context's TensorRT context, streams, slots and buffers (on its own thread and GPU)."""
        cuda = self._cuda
        assert cuda is not None
        cuda.set_device(ctx.device)
        engine = self._engine_for(ctx.device)
        ctx.context = engine.create_execution_context()
        if ctx.context is None:
            raise EngineError(
                f"{self._settings.model_file}: create_execution_context returned None on GPU {ctx.device}"
                f"{self._last_trt_error()}"
            )
        output_shapes = self._max_output_shapes(ctx.context)
        for tensor in self._tensors:
            if not tensor.is_input:
                tensor.max_shape = output_shapes[tensor.name]
        ctx.streams.extend(cuda.stream() for _ in range(3))
        for index in range(self._depth):
            slot = _Slot(index)
            ctx.slots.append(slot)
            for _ in range(3):
                slot.events.append(cuda.event())
            for tensor in self._tensors:
                host, dev = (slot.host_in, slot.dev_in) if tensor.is_input else (slot.host_out, slot.dev_out)
                dev[tensor.name] = cuda.device_buffer(tensor.max_bytes)
                host[tensor.name] = cuda.pinned(tensor.max_bytes)

    def _max_output_shapes(self, context: tensorrt.IExecutionContext) -> dict[str, tuple[int, ...]]:
        """Each output's shape at the profile's max input shapes: what its buffers must hold."""
        for name, (_, _, high) in self._profile.items():
            if not context.set_input_shape(name, high):
                raise EngineError(f"set_input_shape({name!r}, {list(high)}) returned False{self._last_trt_error()}")
        shapes: dict[str, tuple[int, ...]] = {}
        for tensor in self._tensors:
            if not tensor.is_input:
                shape = _shape(context.get_tensor_shape(tensor.name))
                if any(dim < 0 for dim in shape):
                    raise EngineError(
                        f"{self._settings.model_file}: output {tensor.name!r} has a data-dependent shape "
                        f"{list(shape)}; tensorgate sizes output buffers at load and cannot serve it"
                    )
                shapes[tensor.name] = shape
        return shapes

    # Running batches -----------------------------------------------------------------------------------------------

    def _check_inputs(self, inputs: Arrays) -> Shapes:
        """The batch's input shapes in tensor order, or EngineInputError naming what does not fit the profile."""
        shapes: list[tuple[int, ...]] = []
        for spec in self._inputs:
            array = inputs.get(spec.name)
            if array is None:
                raise EngineInputError(f"missing input {spec.name!r}")
            if array.dtype != spec.dtype:
                raise EngineInputError(f"input {spec.name!r} has dtype {array.dtype}, the plan takes {spec.dtype}")
            low, _, high = self._profile[spec.name]
            if len(array.shape) != len(low) or not all(
                a <= dim <= b for dim, a, b in zip(array.shape, low, high, strict=True)
            ):
                raise EngineInputError(
                    f"input {spec.name!r} has shape {list(array.shape)}, outside the TensorRT plan's optimization "
                    f"profile: {list(low)} to {list(high)}"
                )
            shapes.append(tuple(array.shape))
        if len(inputs) != len(self._inputs):
            extra = sorted(set(inputs) - {spec.name for spec in self._inputs})
            raise EngineInputError(
                f"unknown input {extra[0]!r} (the plan takes {', '.join(s.name for s in self._inputs)})"
            )
        return tuple(shapes)

    async def infer(
        self, inputs: Arrays, *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Run one batch on instance `instance` (context instance % contexts, slot instance // contexts)."""
        if not self._loaded:
            raise EngineError("the engine is not loaded")
        if not 0 <= instance < self.instance_count:
            raise EngineError(f"instance {instance} does not exist (0 to {self.instance_count - 1})")
        shapes = self._check_inputs(inputs)
        known = {spec.name for spec in self._outputs}
        wanted = list(outputs) if outputs is not None else [spec.name for spec in self._outputs]
        for name in wanted:
            if name not in known:
                raise EngineInputError(f"unknown output {name!r} (the plan gives {', '.join(sorted(known))})")
        ctx = self._contexts[instance % len(self._contexts)]
        slot = ctx.slots[instance // len(self._contexts)]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, npt.NDArray[Any]]] = loop.create_future()
        job = functools.partial(self._enqueue, ctx, slot, inputs, shapes, wanted, done, loop)
        try:
            await ctx.enqueuer.run(job)
        except RuntimeError:  # the engine is closing: its threads take no more work
            raise EngineError("the engine is closing") from None
        return await done

    def _enqueue(
        self,
        ctx: _Context,
        slot: _Slot,
        inputs: Arrays,
        shapes: Shapes,
        wanted: list[str],
        done: asyncio.Future[dict[str, npt.NDArray[Any]]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Queue one batch on ctx's streams (enqueue thread; does not wait for the GPU). Failures settle `done`."""
        try:
            output_shapes = self._queue_batch(ctx, slot, inputs, shapes, wanted)
        except BaseException as exc:
            self._drain(ctx)
            settle(loop, reject, done, _engine_error(exc))
            return

        def complete() -> None:
            try:
                result = self._collect(slot, output_shapes)
            except BaseException as exc:
                self._drain(ctx)
                settle(loop, reject, done, _engine_error(exc))
            else:
                settle(loop, resolve, done, result)

        ctx.completer.submit(complete)

    def _queue_batch(
        self, ctx: _Context, slot: _Slot, inputs: Arrays, shapes: Shapes, wanted: list[str]
    ) -> dict[str, tuple[int, ...]]:
        """Queue copies, compute and copies back for one batch; the shapes of the wanted outputs."""
        context = ctx.context
        assert context is not None
        specs = self._inputs
        if slot.used:
            # The slot's previous batch has normally finished (its instance is reused only after its result was
            # delivered), so this returns at once. It blocks only when a cancelled caller freed the instance early,
            # and then it keeps that batch's queued H2D copy from reading this batch's inputs.
            slot.d2h_done.synchronize()
        slot.used = True
        # 1. Into the pinned buffers.
        for spec, shape in zip(specs, shapes, strict=True):
            np.copyto(slot.host_in[spec.name].view(spec.dtype, shape), inputs[spec.name], casting="no")
        # 2. Host to device, on the copy stream; compute waits for it on the device, not here.
        for spec, shape in zip(specs, shapes, strict=True):
            ctx.h2d.copy_to_device(slot.dev_in[spec.name], slot.host_in[spec.name], _nbytes(spec.dtype, shape))
        slot.h2d_done.record(ctx.h2d)
        ctx.compute.wait(slot.h2d_done)
        # 3. Compute.
        graph = slot.graphs.get(shapes)
        if graph is not None:
            graph.exec.launch(ctx.compute)
            output_shapes = graph.output_shapes
        else:
            output_shapes = self._execute(ctx, slot, shapes)
            if self._graphs and shapes not in slot.no_graph and len(slot.graphs) < _MAX_GRAPHS_PER_SLOT:
                self._capture(ctx, slot, shapes, output_shapes)
        slot.compute_done.record(ctx.compute)
        # 4. Device to host, on the other copy stream, once compute is done; only the outputs asked for.
        ctx.d2h.wait(slot.compute_done)
        by_name = {tensor.name: tensor for tensor in self._tensors}
        for name in wanted:
            nbytes = _nbytes(by_name[name].dtype, output_shapes[name])
            ctx.d2h.copy_to_host(slot.host_out[name], slot.dev_out[name], nbytes)
        slot.d2h_done.record(ctx.d2h)
        return {name: output_shapes[name] for name in wanted}

    def _execute(self, ctx: _Context, slot: _Slot, shapes: Shapes) -> dict[str, tuple[int, ...]]:
        """Set shapes and addresses and queue execute_async_v3 on the compute stream; every output's shape."""
        context = ctx.context
        assert context is not None
        for spec, shape in zip(self._inputs, shapes, strict=True):
            if not context.set_input_shape(spec.name, shape):
                raise EngineError(
                    f"set_input_shape({spec.name!r}, {list(shape)}) returned False{self._last_trt_error()}"
                )
        output_shapes: dict[str, tuple[int, ...]] = {}
        for tensor in self._tensors:
            buffer = (slot.dev_in if tensor.is_input else slot.dev_out)[tensor.name]
            if not context.set_tensor_address(tensor.name, buffer.pointer):
                raise EngineError(f"set_tensor_address({tensor.name!r}) returned False{self._last_trt_error()}")
            if not tensor.is_input:
                shape = _shape(context.get_tensor_shape(tensor.name))
                if any(dim < 0 for dim in shape) or _nbytes(tensor.dtype, shape) > buffer.nbytes:
                    raise EngineError(
                        f"output {tensor.name!r} would have shape {list(shape)}, more than its buffer "
                        f"(sized for {list(tensor.max_shape)}) holds"
                    )
                output_shapes[tensor.name] = shape
        if not context.execute_async_v3(int(ctx.compute.handle)):
            raise EngineError(f"execute_async_v3 returned False{self._last_trt_error()}")
        return output_shapes

    def _capture(self, ctx: _Context, slot: _Slot, shapes: Shapes, output_shapes: dict[str, tuple[int, ...]]) -> None:
        """Record execute_async_v3 at these shapes and slot addresses into a CUDA graph (after a normal run, which
        lets TensorRT finish any shape-dependent setup). A failure only means these shapes run without a graph."""
        context = ctx.context
        assert context is not None
        graph: Graph | None = None
        try:
            ctx.compute.begin_capture()
            try:
                captured = context.execute_async_v3(int(ctx.compute.handle))
            finally:
                graph = ctx.compute.end_capture()  # always: a stream left capturing would fail everything after
            if not captured:
                raise EngineError(f"execute_async_v3 returned False while capturing{self._last_trt_error()}")
            slot.graphs[shapes] = _Graph(graph, graph.instantiate(), output_shapes)
        except (EngineError, RuntimeError) as exc:
            slot.no_graph.add(shapes)
            if graph is not None:
                _close_quietly(graph)
            log.warning("no CUDA graph for input shapes %s on context %d: %s", list(shapes), ctx.index, exc)

    def _collect(self, slot: _Slot, output_shapes: dict[str, tuple[int, ...]]) -> dict[str, npt.NDArray[Any]]:
        """Wait (completion thread) for the batch's copies back, and copy the outputs out of the pinned buffers."""
        slot.d2h_done.synchronize()
        dtypes = {tensor.name: tensor.dtype for tensor in self._tensors}
        return {name: slot.host_out[name].view(dtypes[name], shape).copy() for name, shape in output_shapes.items()}

    def _drain(self, ctx: _Context) -> None:
        """After a failed batch: let whatever it queued finish, so the slot is clean for the next one."""
        for stream in ctx.streams:
            try:
                stream.synchronize()
            except EngineError as exc:
                log.warning("draining context %d after a failed batch: %s", ctx.index, exc)

    async def warmup(self) -> None:
        """Run every slot of every context once at the profile's opt shapes (capturing their graph when on)."""
        batch = {spec.name: np.zeros(self._profile[spec.name][1], dtype=spec.dtype) for spec in self._inputs}
        await asyncio.gather(*(self.infer(batch, instance=i) for i in range(self.instance_count)))

    # Closing ---------------------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the batches in flight, then free every graph, buffer, event, stream, context, engine and runtime,
        and stop the threads. Safe to call twice."""
        self._loaded = False
        contexts, self._contexts = self._contexts, []
        last_on_device = {ctx.device: ctx.index for ctx in contexts}
        for ctx in contexts:
            # Once this returns, every batch queued so far has reached the completion thread.
            with contextlib.suppress(RuntimeError):
                await ctx.enqueuer.run(lambda: None)
            ctx.enqueuer.close()
            # After the batches it holds: free the context's objects on its own thread, where its GPU is current
            # (and the GPU's engine and runtime with the last context on it).
            release = last_on_device[ctx.device] == ctx.index
            await ctx.completer.run(functools.partial(self._free_context, ctx, release_engine=release))
            ctx.completer.close()
        # Whatever is left (nothing, unless a load failed half way): engines before the runtimes that made them.
        self._engines.clear()
        self._runtimes.clear()

    def _free_context(self, ctx: _Context, *, release_engine: bool) -> None:
        for stream in ctx.streams:
            try:
                stream.synchronize()
            except EngineError as exc:
                log.warning("closing context %d: %s", ctx.index, exc)
        owned: list[Graph | GraphExec | PinnedBuffer | DeviceBuffer | Event | Stream] = []
        for slot in ctx.slots:
            for graph in slot.graphs.values():
                owned += [graph.exec, graph.graph]
            slot.graphs.clear()
            owned += [*slot.host_in.values(), *slot.dev_in.values(), *slot.dev_out.values(), *slot.host_out.values()]
            owned += slot.events
        ctx.slots.clear()
        # The TensorRT context before the streams it ran on; it holds no buffer of ours.
        ctx.context = None
        owned += ctx.streams
        ctx.streams.clear()
        for item in owned:
            _close_quietly(item)
        if release_engine:
            self._engines.pop(ctx.device, None)
            self._runtimes.pop(ctx.device, None)


def _close_quietly(item: Graph | GraphExec | PinnedBuffer | DeviceBuffer | Event | Stream) -> None:
    try:
        item.close()
    except CudaError as exc:  # keep freeing the rest
        log.warning("freeing a CUDA object: %s", exc)


def _engine_error(exc: BaseException) -> BaseException:
    """EngineErrors as they are; anything TensorRT's bindings raised, as an EngineError carrying its message."""
    if isinstance(exc, EngineError) or not isinstance(exc, Exception):
        return exc
    return EngineError(f"TensorRT failed: {type(exc).__name__}: {exc}")
