"""The ONNX Runtime engine: the embedded default, and the fallback when TensorRT cannot serve a model.

Each instance is its own InferenceSession served from its own single thread, so instances run batches in
parallel (ONNX Runtime releases the GIL inside `run`) and the event loop never blocks on compute.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from tensorgate.engines.base import Arrays, EngineError, EngineSettings, TensorSpec
from tensorgate.engines.threads import InstanceThread

__all__ = ["OnnxRuntimeEngine"]

# ONNX Runtime's type strings and the numpy dtype that carries each.
_ORT_DTYPES: dict[str, np.dtype[Any]] = {
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(bfloat16)": np.dtype(ml_dtypes.bfloat16),
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(string)": np.dtype(np.object_),
}

_BF16 = np.dtype(ml_dtypes.bfloat16)
# ONNX's TensorProto.BFLOAT16, without importing onnx at run time.
_ONNX_BFLOAT16 = 16

# Most capable first; only those this onnxruntime build has are used.
_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _spec(arg: Any) -> TensorSpec:
    try:
        dtype = _ORT_DTYPES[arg.type]
    except KeyError:
        raise EngineError(f"tensor {arg.name!r} has type {arg.type}, which tensorgate cannot serve") from None
    # Symbolic or unknown dimensions (strings, None) are variable.
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
    return TensorSpec(arg.name, dtype, shape)


class OnnxRuntimeEngine:
    """Serves an ONNX model with ONNX Runtime, `instance_count` sessions each on its own thread.

    Settings read from `parameters`: "execution_providers" (comma-separated, in order of preference;
    default: TensorRT, CUDA, then CPU, whichever this build has), "inter_op_threads" (default 1) and
    "allow_spinning" ("0" stops ONNX Runtime's pool threads spinning between runs, which suits tiny models;
    ONNX Runtime's default otherwise).
    """

    def __init__(self, settings: EngineSettings) -> None:
        if settings.instance_count < 1:
            raise EngineError(f"instance_count must be at least 1, got {settings.instance_count}")
        self._settings = settings
        self._sessions: list[ort.InferenceSession] = []
        self._threads: list[InstanceThread] = []
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._providers: list[str] = []
        self._uses_bf16 = False

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        """The model's inputs, as the loaded session reports them."""
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        """The model's outputs, as the loaded session reports them."""
        return self._outputs

    @property
    def instance_count(self) -> int:
        """Sessions that may run batches at once."""
        return self._settings.instance_count

    @property
    def description(self) -> str:
        """Which onnxruntime and which execution providers actually serve the model."""
        return f"onnxruntime {ort.__version__} ({', '.join(self._providers) or 'not loaded'})"

    def _providers_to_use(self) -> list[str]:
        available = set(ort.get_available_providers())
        wanted = self._settings.parameters.get("execution_providers")
        preferred = [p.strip() for p in wanted.split(",")] if wanted else list(_PREFERRED_PROVIDERS)
        chosen = [p for p in preferred if p in available]
        if not chosen:
            raise EngineError(
                f"none of the execution providers {preferred} is available (this build has {sorted(available)})"
            )
        return chosen

    def _new_session(self) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._settings.intra_op_threads
        options.inter_op_num_threads = int(self._settings.parameters.get("inter_op_threads", "1"))
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Our own logs say what matters; ORT's warnings (e.g. about unavailable providers) would be noise.
        options.log_severity_level = 3
        # ONNX Runtime's pool threads spin after each run by default: worth it for compute-bound models (about
        # 10% on ResNet-18 here), wasteful for tiny ones, whose spinning threads take the CPU the event loop
        # needs to answer the next requests. Models choose with the "allow_spinning" parameter.
        spinning = self._settings.parameters.get("allow_spinning")
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        return ort.InferenceSession(str(self._settings.model_file), options, providers=self._providers)

    async def load(self) -> None:
        """Create every session (off the event loop). EngineError names the file and ONNX Runtime's reason."""
        path = self._settings.model_file
        if not path.is_file():
            raise EngineError(f"{path}: no such model file")
        self._providers = self._providers_to_use()
        for index in range(self._settings.instance_count):
            thread = InstanceThread(f"ort-{path.parent.parent.name}-v{path.parent.name}-{index}")
            self._threads.append(thread)
            try:
                session = await thread.run(self._new_session)
            except Exception as exc:  # ONNX Runtime raises its own exception types for broken files
                await self.close()
                raise EngineError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
            self._sessions.append(session)
        first = self._sessions[0]
        try:
            self._inputs = tuple(_spec(arg) for arg in first.get_inputs())
            self._outputs = tuple(_spec(arg) for arg in first.get_outputs())
        except EngineError as exc:
            await self.close()
            raise EngineError(f"{path}: {exc}") from exc
        self._providers = list(first.get_providers())
        self._uses_bf16 = any(spec.dtype == _BF16 for spec in (*self._inputs, *self._outputs))

    async def warmup(self) -> None:
        """Run every instance once on zeros, variable dimensions set to 1."""
        batch = {
            spec.name: np.zeros(tuple(1 if dim < 0 else dim for dim in spec.shape), dtype=spec.dtype)
            for spec in self._inputs
        }
        for spec in self._inputs:
            if spec.dtype == np.object_:
                batch[spec.name] = np.full(batch[spec.name].shape, "", dtype=np.object_)
        await asyncio.gather(*(self.infer(batch, instance=i) for i in range(self.instance_count)))

    def _run(self, instance: int, inputs: Arrays, outputs: Sequence[str] | None) -> dict[str, npt.NDArray[Any]]:
        feed = {name: _to_ort(value) for name, value in inputs.items()}
        names = list(outputs) if outputs is not None else [spec.name for spec in self._outputs]
        session = self._sessions[instance]
        if self._uses_bf16:
            return dict(zip(names, _run_bf16(session, names, feed), strict=True))
        results = session.run(names, feed)
        return {name: _from_ort(value) for name, value in zip(names, results, strict=True)}

    async def infer(
        self, inputs: Arrays, *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """Run one batch on session `instance`, on that session's thread."""
        if not self._sessions:
            raise EngineError("the engine is not loaded")
        call = functools.partial(self._run, instance, inputs, outputs)
        try:
            return await self._threads[instance].run(call)
        except EngineError:
            raise
        except Exception as exc:  # ONNX Runtime's own error types carry the reason in their message
            raise EngineError(f"ONNX Runtime failed: {exc}") from exc

    async def close(self) -> None:
        """Drop the sessions and stop their threads (waiting for a running batch to finish)."""
        self._sessions.clear()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.close()


def _map_objects(array: npt.NDArray[Any], convert: Any) -> npt.NDArray[np.object_]:
    out = np.empty(array.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        flat[index] = convert(item)
    return out


def _to_ort(value: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # ONNX Runtime takes string tensors as str objects; the wire carries bytes.
    if value.dtype == np.object_:
        return _map_objects(value, lambda item: item.decode() if isinstance(item, bytes) else item)
    return value


def _from_ort(value: Any) -> npt.NDArray[Any]:
    array: npt.NDArray[Any] = np.asarray(value)
    if array.dtype.kind in "UO":
        return _map_objects(array, lambda item: item.encode() if isinstance(item, str) else item)
    return array


def _run_bf16(session: ort.InferenceSession, names: list[str], feed: dict[str, npt.NDArray[Any]]) -> list[Any]:
    """Run through OrtValues: ONNX Runtime's numpy binding has no bfloat16, so BF16 crosses as raw 16-bit words."""
    values = {
        name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ONNX_BFLOAT16)
        if array.dtype == _BF16
        else ort.OrtValue.ortvalue_from_numpy(array)
        for name, array in feed.items()
    }
    results: list[Any] = []
    for value in session.run_with_ort_values(names, values):
        if value.data_type() == "tensor(bfloat16)":
            raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
            results.append(np.frombuffer(raw, dtype=_BF16).reshape(value.shape()))
        else:
            results.append(_from_ort(value.numpy()))
    return results
