"""Protobuf <-> core conversions shared by our API's adapters (the `decode` and `encode` stages)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy.typing as npt

from tensorgate.client.tensors import TensorFormatError, from_tensor, to_tensor
from tensorgate.server.errors import InvalidInputError
from tensorgate.v1 import tensor_pb2

__all__ = ["RequestIds", "deadline_from", "decode_inputs", "encode_outputs", "requested_outputs", "status_number"]


class RequestIds:
    """Cheap unique request ids: a per-process random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        """A fresh id, unique within this process and unlikely to repeat across processes."""
        return f"{self._prefix}-{next(self._counter):x}"


def decode_inputs(tensors: Iterable[tensor_pb2.Tensor]) -> dict[str, npt.NDArray[Any]]:
    """Decode request tensors (zero-copy views of the message's bytes); InvalidInputError naming the tensor."""
    inputs: dict[str, npt.NDArray[Any]] = {}
    for tensor in tensors:
        if tensor.name in inputs:
            raise InvalidInputError(f"input {tensor.name!r} is given more than once")
        try:
            inputs[tensor.name] = from_tensor(tensor)
        except TensorFormatError as exc:
            raise InvalidInputError(str(exc).replace("tensor ", "input ", 1)) from None
    return inputs


def encode_outputs(outputs: Mapping[str, npt.NDArray[Any]]) -> list[tensor_pb2.Tensor]:
    """Encode result arrays as raw little-endian tensors."""
    return [to_tensor(name, array) for name, array in outputs.items()]


def deadline_from(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The call's deadline on time.monotonic(), or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def status_number(code_name: str) -> int:
    """The numeric gRPC status code of a code name such as "INVALID_ARGUMENT"."""
    value: tuple[int, str] = grpc.StatusCode[code_name].value
    return value[0]


def requested_outputs(names: Sequence[str]) -> tuple[str, ...] | None:
    """The outputs a request asked for, None meaning all."""
    return tuple(names) or None
