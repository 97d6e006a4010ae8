"""Per-request limits the adapters and the request path check: tensor elements, rows, stream frame size.

Each is off at 0. The adapters call `check_elements` on the tensor headers before decoding anything (so a huge
shape costs nothing), `check_frame` on each stream message; the request path calls `check_rows` once the request
matches its model. Errors name the tensor and the setting, so a caller knows what to change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from tensorgate.server.errors import InvalidInputError, ResourceExhaustedError

__all__ = ["Limits", "TensorHeader"]


class TensorHeader(Protocol):
    """What the element check reads of a request tensor (ours and the Open Inference Protocol's have both)."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """The server's per-request limits (`ServerSettings` fields of the same names; 0: off)."""

    max_tensor_elements: int = 0
    max_request_rows: int = 0
    max_frame_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("max_tensor_elements", "max_request_rows", "max_frame_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name!r} must be >= 0 (0: no limit), got {getattr(self, name)}")

    def check_elements(self, tensors: Iterable[TensorHeader]) -> None:
        """InvalidInputError naming the first tensor whose shape has more than `max_tensor_elements` elements."""
        limit = self.max_tensor_elements
        if not limit:
            return
        for tensor in tensors:
            shape = tensor.shape
            if any(dim < 0 for dim in shape):
                continue  # not a shape at all: decoding says so, naming the tensor
            count = math.prod(shape)
            if count > limit:
                raise InvalidInputError(
                    f"input {tensor.name!r}: shape {list(shape)} has {count} elements, more than "
                    f"max_tensor_elements={limit}"
                )

    def check_rows(self, max_batch_size: int, inputs: Mapping[str, npt.NDArray[Any]]) -> None:
        """InvalidInputError when a batching model's request carries more than `max_request_rows` rows.

        Call it after the model's own checks (every input has the same rows, at most `max_batch_size`), so only
        the stricter server-wide bound is left to check. Models that do not batch have no rows to count.
        """
        limit = self.max_request_rows
        if not limit or not max_batch_size:
            return
        for name, array in inputs.items():
            if array.ndim and array.shape[0] > limit:
                raise InvalidInputError(
                    f"input {name!r} has a batch of {array.shape[0]} rows; the server takes at most "
                    f"max_request_rows={limit} per request"
                )
            return  # the model's check made every input's rows equal

    def check_frame(self, size: int, what: str = "frame") -> None:
        """ResourceExhaustedError when one stream message of `size` bytes is over `max_frame_bytes`."""
        limit = self.max_frame_bytes
        if limit and size > limit:
            raise ResourceExhaustedError(
                f"the {what} is {size} bytes, more than max_frame_bytes={limit}; it was not run"
            )
