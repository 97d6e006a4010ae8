"""Checks on what an engine returns for a batch, before the batcher splits it back to the batch's requests.

An engine that returns a wrong dtype, a wrong inner shape, a missing or an extra output must fail its batch
with an error that names the output, never reach a caller as a silent wrong answer (bytes that contradict the
model's metadata) or surface later as a KeyError. The batcher turns the raised `EngineError` into an
`EngineFailedError` (INTERNAL, with the request id) for that batch's requests only; the next batch runs as usual.

Dimension 0 of a batched model is checked by the batcher itself (`Batcher._scatter`), which knows the batch's
rows; here a variable dimension (-1 in the engine's spec) accepts any size. The cost is a few dict lookups and
comparisons per batch, never per element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from tensorgate.client.tensors import TensorFormatError, dtype_name
from tensorgate.engines import EngineError, TensorSpec

__all__ = ["check_outputs"]

M = TypeVar("M", bound=Mapping[str, Any])


def _dtype(dtype: np.dtype[Any]) -> str:
    try:
        return dtype_name(dtype)
    except TensorFormatError:  # a dtype no tensor carries: numpy's own name says what it is
        return str(dtype)


def _same_dtype(have: np.dtype[Any], want: np.dtype[Any]) -> bool:
    """Whether an output of dtype `have` is one of dtype `want` on the wire: the byte order, and str/bytes/object
    for BYTES, are the encoder's business."""
    if have == want:
        return True
    if want.kind == "O":
        return have.kind in "SUO"
    return have.kind == want.kind and have.newbyteorder("<") == want.newbyteorder("<")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join("-1" if dim < 0 else str(dim) for dim in shape) + "]"


def check_outputs(specs: Sequence[TensorSpec], outputs: M) -> M:
    """Return `outputs` unchanged when they match `specs` (the engine's declared outputs); else raise EngineError.

    Every declared output must be present, a numpy array of the declared dtype, with the declared number of
    dimensions and the declared size on every fixed (non -1) dimension; no undeclared output may be present.
    The message names the output and the expected and actual dtype or shape.
    """
    if not isinstance(outputs, Mapping):
        raise EngineError(f"the engine returned {type(outputs).__name__}, not a mapping of output names to arrays")
    for spec in specs:
        array = outputs.get(spec.name)
        if array is None:
            returned = ", ".join(repr(name) for name in outputs) or "none"
            raise EngineError(f"engine output {spec.name!r} is missing (the engine returned: {returned})")
        if not isinstance(array, np.ndarray):
            raise EngineError(
                f"engine output {spec.name!r} is a {type(array).__name__}, not a numpy array "
                f"(expected {_dtype(spec.dtype)} {_shape(spec.shape)})"
            )
        if array.dtype != spec.dtype and not _same_dtype(array.dtype, spec.dtype):
            raise EngineError(
                f"engine output {spec.name!r} has dtype {_dtype(array.dtype)}, expected {_dtype(spec.dtype)}"
            )
        shape = array.shape
        if len(shape) != len(spec.shape) or any(
            want >= 0 and have != want for have, want in zip(shape, spec.shape, strict=True)
        ):
            raise EngineError(
                f"engine output {spec.name!r} has shape {_shape(shape)}, expected {_shape(spec.shape)} (-1: any size)"
            )
    if len(outputs) > len(specs):
        declared = {spec.name for spec in specs}
        extra = sorted(name for name in outputs if name not in declared)
        raise EngineError(
            f"engine output {extra[0]!r} is not one the model declares "
            f"(it declares: {', '.join(repr(spec.name) for spec in specs)})"
        )
    return outputs
