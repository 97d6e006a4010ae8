"""Reading `config.pbtxt`, and reconciling a model's config with what its engine reports.

A config is Triton's text format over our `ModelConfig` message. Anything the file does not say is taken from
the model itself (inputs, outputs, whether the first dimension batches), so a version directory holding only
`model.onnx` is servable as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import text_format

from tensorgate.client.tensors import dtype_from_name, dtype_name
from tensorgate.engines import TensorSpec
from tensorgate.engines.registry import platform_for_backend, registered_platforms
from tensorgate.server.errors import InvalidInputError, ModelConfigError
from tensorgate.v1 import model_config_pb2

__all__ = [
    "CONFIG_FILENAME",
    "ModelSignature",
    "config_dtype",
    "read_config",
    "reconcile",
]

CONFIG_FILENAME = "config.pbtxt"
ModelConfig = model_config_pb2.ModelConfig


def read_config(model_dir: Path) -> ModelConfig:
    """Parse `<model_dir>/config.pbtxt` and check its values; an empty config when there is no file.

    Raises ModelConfigError naming the file and the problem: an unknown field, a bad value, a syntax error.
    """
    path = model_dir / CONFIG_FILENAME
    config = ModelConfig()
    if path.is_file():
        try:
            text_format.Parse(path.read_text(encoding="utf-8"), config)
        except text_format.ParseError as exc:
            # Compiler-style "file:line:column: problem", which editors and terminals link to.
            problem = str(exc).split(" : ", 1)[-1]
            raise ModelConfigError(f"{path}:{exc.GetLine()}:{exc.GetColumn()}: {problem}") from None
        except UnicodeDecodeError as exc:
            raise ModelConfigError(f"{path}: not UTF-8 text: {exc}") from None
    if not config.name:
        config.name = model_dir.name
    _check_values(config, path, model_dir.name)
    return config


def _check_values(config: ModelConfig, path: Path, directory_name: str) -> None:
    problems: list[str] = []
    if config.name != directory_name:
        problems.append(f"name {config.name!r} differs from the directory name {directory_name!r}")
    if config.platform and config.platform not in registered_platforms():
        problems.append(f"platform {config.platform!r} is not one of {', '.join(registered_platforms())}")
    if config.backend:
        try:
            backend_platform = platform_for_backend(config.backend)
        except Exception as exc:
            problems.append(str(exc))
        else:
            if config.platform and config.platform != backend_platform:
                problems.append(f"backend {config.backend!r} does not serve platform {config.platform!r}")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    batching = config.dynamic_batching
    for size in batching.preferred_batch_size:
        if size < 1 or (config.max_batch_size and size > config.max_batch_size):
            problems.append(f"preferred_batch_size {size} must be within 1..max_batch_size")
    if batching.priority_levels and not 0 <= batching.default_priority_level <= batching.priority_levels:
        problems.append(
            f"default_priority_level {batching.default_priority_level} is outside 1..{batching.priority_levels}"
        )
    for group in config.instance_group:
        if group.count < 0:
            problems.append(f"instance_group count must be >= 0, got {group.count}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            if not tensor.name:
                problems.append(f"an {kind} has no name")
            if tensor.data_type in (model_config_pb2.TYPE_INVALID,):
                problems.append(f"{kind} {tensor.name!r} has no data_type")
            if any(dim < -1 for dim in tensor.dims):
                problems.append(f"{kind} {tensor.name!r} has a dimension below -1 in {list(tensor.dims)}")
    if config.version_policy.HasField("specific") and not config.version_policy.specific.versions:
        problems.append("version_policy specific lists no versions")
    if problems:
        raise ModelConfigError(f"{path}: " + "; ".join(problems))


def config_dtype(data_type: int) -> np.dtype[Any]:
    """The numpy dtype of a config `TYPE_*` value (TYPE_STRING is BYTES)."""
    name = model_config_pb2.ModelDataType.Name(data_type).removeprefix("TYPE_")  # type: ignore[arg-type]
    return dtype_from_name("BYTES" if name == "STRING" else name)


def _config_data_type(dtype: np.dtype[Any]) -> model_config_pb2.ModelDataType.ValueType:
    name = dtype_name(dtype)
    return model_config_pb2.ModelDataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What a served model takes and gives, batch dimension included (-1) when it batches."""

    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optional_inputs: frozenset[str] = frozenset()
    # Derived once, read on every request.
    input_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_names", frozenset(spec.name for spec in self.inputs))

    def check_request(self, inputs: Mapping[str, npt.NDArray[Any]], outputs: Sequence[str] | None = None) -> None:
        """Raise InvalidInputError naming the tensor when the request does not fit this signature."""
        rows: int | None = None
        for spec in self.inputs:
            array = inputs.get(spec.name)
            if array is None:
                if spec.name in self.optional_inputs:
                    continue
                raise InvalidInputError(f"missing input {spec.name!r} (the model takes {self._input_names()})")
            if array.dtype != spec.dtype:
                raise InvalidInputError(
                    f"input {spec.name!r} has dtype {dtype_name(array.dtype)}, the model takes {dtype_name(spec.dtype)}"
                )
            if array.ndim != len(spec.shape) or any(
                want >= 0 and have != want for have, want in zip(array.shape, spec.shape, strict=False)
            ):
                raise InvalidInputError(
                    f"input {spec.name!r} has shape {list(array.shape)}, the model takes {list(spec.shape)}"
                    + (" (-1: any size)" if -1 in spec.shape else "")
                )
            if (
                spec.min_shape is not None
                and spec.max_shape is not None
                and not all(
                    low <= have <= high
                    for have, low, high in zip(array.shape, spec.min_shape, spec.max_shape, strict=True)
                )
            ):
                raise InvalidInputError(
                    f"input {spec.name!r} has shape {list(array.shape)}, outside the engine's optimization profile "
                    f"(from {list(spec.min_shape)} to {list(spec.max_shape)})"
                )
            if self.max_batch_size:
                if rows is None:
                    rows = array.shape[0]
                elif array.shape[0] != rows:
                    raise InvalidInputError(
                        f"input {spec.name!r} has {array.shape[0]} rows in its batch dimension, "
                        f"other inputs have {rows}"
                    )
        if len(inputs) > len(self.inputs) or any(name not in self.input_names for name in inputs):
            extra = sorted(set(inputs) - self.input_names)
            raise InvalidInputError(f"unknown input {extra[0]!r} (the model takes {self._input_names()})")
        if rows is not None and not 1 <= rows <= self.max_batch_size:
            raise InvalidInputError(
                f"input {self.inputs[0].name!r} has a batch of {rows} rows; the model takes 1 to "
                f"{self.max_batch_size} (max_batch_size)"
            )
        if outputs:
            known = {spec.name for spec in self.outputs}
            for name in outputs:
                if name not in known:
                    raise InvalidInputError(f"unknown output {name!r} (the model gives {', '.join(sorted(known))})")

    def _input_names(self) -> str:
        return ", ".join(spec.name for spec in self.inputs)


def _merge_dims(config_dims: Sequence[int], engine_dims: Sequence[int]) -> tuple[int, ...] | None:
    """The more specific of two compatible shapes, or None when they conflict."""
    if len(config_dims) != len(engine_dims):
        return None
    merged: list[int] = []
    for want, have in zip(config_dims, engine_dims, strict=True):
        if want >= 0 and have >= 0 and want != have:
            return None
        merged.append(want if want >= 0 else have)
    return tuple(merged)


def _reconcile_tensors(
    kind: str,
    configured: Sequence[model_config_pb2.ModelInput] | Sequence[model_config_pb2.ModelOutput],
    engine_specs: Sequence[TensorSpec],
    batch_dims: int,
    where: Path,
) -> tuple[TensorSpec, ...]:
    by_name = {spec.name: spec for spec in engine_specs}
    if not configured:
        return tuple(engine_specs)
    result: list[TensorSpec] = []
    for tensor in configured:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise ModelConfigError(f"{where}: {kind} {tensor.name!r} is not in the model (it has {', '.join(by_name)})")
        dtype = config_dtype(tensor.data_type)
        if dtype != spec.dtype:
            raise ModelConfigError(
                f"{where}: {kind} {tensor.name!r} is {dtype_name(dtype)} in the config but "
                f"{dtype_name(spec.dtype)} in the model"
            )
        dims = _merge_dims(list(tensor.dims), spec.shape[batch_dims:])
        if dims is None:
            raise ModelConfigError(
                f"{where}: {kind} {tensor.name!r} has dims {list(tensor.dims)} in the config but the model's "
                f"shape is {list(spec.shape)}" + (" (batch dimension first)" if batch_dims else "")
            )
        # replace() keeps the engine's shape bounds (a TensorRT profile) for the request checks.
        result.append(replace(spec, shape=(-1,) * batch_dims + dims))
    if kind == "input":
        missing = sorted(set(by_name) - {tensor.name for tensor in configured})
        if missing:
            raise ModelConfigError(f"{where}: the model's input {missing[0]!r} is not in the config")
    return tuple(result)


def reconcile(
    config: ModelConfig,
    engine_inputs: Sequence[TensorSpec],
    engine_outputs: Sequence[TensorSpec],
    *,
    where: Path,
    has_config_file: bool,
    default_max_batch_size: int,
) -> tuple[ModelSignature, ModelConfig]:
    """Check a config against the loaded model; return the served signature and the completed config.

    Without a config file, a model whose every input and output has a variable first dimension batches with
    `default_max_batch_size` and dynamic batching; anything else is served as it is, unbatched.
    """
    completed = ModelConfig()
    completed.CopyFrom(config)
    every = [*engine_inputs, *engine_outputs]
    first_dim_variable = all(spec.shape and spec.shape[0] == -1 for spec in every)
    # An engine with a fixed optimization profile (TensorRT) bounds the batch it can run.
    bounded = [spec for spec in engine_inputs if spec.max_shape]
    profile_max = min((spec.max_shape[0] for spec in bounded if spec.max_shape), default=0) if first_dim_variable else 0
    if not has_config_file and first_dim_variable and default_max_batch_size > 0:
        completed.max_batch_size = min(default_max_batch_size, profile_max) if profile_max else default_max_batch_size
        completed.dynamic_batching.SetInParent()
    if profile_max and completed.max_batch_size > profile_max:
        tight = next(spec for spec in bounded if spec.max_shape and spec.max_shape[0] == profile_max)
        raise ModelConfigError(
            f"{where}: max_batch_size is {completed.max_batch_size} but the engine's optimization profile takes at "
            f"most {profile_max} rows of input {tight.name!r}"
        )
    if completed.max_batch_size > 0 and not first_dim_variable:
        fixed = next(spec for spec in every if not spec.shape or spec.shape[0] != -1)
        raise ModelConfigError(
            f"{where}: max_batch_size is {completed.max_batch_size} but the model's tensor {fixed.name!r} has "
            f"shape {list(fixed.shape)}, without a variable first (batch) dimension"
        )
    batch_dims = 1 if completed.max_batch_size > 0 else 0
    inputs = _reconcile_tensors("input", config.input, engine_inputs, batch_dims, where)
    outputs = _reconcile_tensors("output", config.output, engine_outputs, batch_dims, where)
    if not config.input:
        for spec in inputs:
            completed.input.add(name=spec.name, data_type=_config_data_type(spec.dtype), dims=spec.shape[batch_dims:])
    if not config.output:
        for spec in outputs:
            completed.output.add(name=spec.name, data_type=_config_data_type(spec.dtype), dims=spec.shape[batch_dims:])
    optional = frozenset(tensor.name for tensor in config.input if tensor.optional)
    return ModelSignature(completed.max_batch_size, inputs, outputs, optional), completed
