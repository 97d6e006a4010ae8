"""TensorRT's enums, Dims, loggers and IHostMemory as the fake `tensorrt` module exposes them, and shared helpers."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import ml_dtypes
import numpy as np

from tests.support.gpu_simulator.core import SimState
from tests.support.gpu_simulator.memory import Memory
from tests.support.gpu_simulator.runtime import CudaRuntime
from tests.support.gpu_simulator.streams import Scheduler

__all__ = [
    "NUMPY_DTYPES",
    "ORT_TYPES",
    "DataType",
    "Dims",
    "ExecutionContextAllocationStrategy",
    "IHostMemory",
    "ILogger",
    "Logger",
    "MemoryPoolType",
    "NetworkDefinitionCreationFlag",
    "TensorIOMode",
    "TrtContext",
]

_log = logging.getLogger("tests.gpu_simulator.tensorrt")


class DataType(enum.IntEnum):
    """Tensor element types."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


class TensorIOMode(enum.IntEnum):
    """Whether a tensor name is an input, an output, or neither."""

    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.IntEnum):
    """Builder memory pools."""

    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    """Network creation flags (TensorRT 10/11: only strong typing remains)."""

    STRONGLY_TYPED = 1


class ExecutionContextAllocationStrategy(enum.IntEnum):
    """How an execution context gets its scratch memory (the simulator needs none)."""

    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


#: ONNX Runtime's type strings and the TensorRT DataType that carries each (others cannot be engine I/O).
ORT_TYPES: dict[str, DataType] = {
    "tensor(float)": DataType.FLOAT,
    "tensor(float16)": DataType.HALF,
    "tensor(bfloat16)": DataType.BF16,
    "tensor(int8)": DataType.INT8,
    "tensor(uint8)": DataType.UINT8,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(bool)": DataType.BOOL,
}

#: The numpy dtype of each DataType the simulator supports.
NUMPY_DTYPES: dict[DataType, np.dtype[Any]] = {
    DataType.FLOAT: np.dtype(np.float32),
    DataType.HALF: np.dtype(np.float16),
    DataType.BF16: np.dtype(ml_dtypes.bfloat16),
    DataType.INT8: np.dtype(np.int8),
    DataType.UINT8: np.dtype(np.uint8),
    DataType.INT32: np.dtype(np.int32),
    DataType.INT64: np.dtype(np.int64),
    DataType.BOOL: np.dtype(np.bool_),
}


class Dims(Sequence[int]):
    """A tensor shape (-1 for a dynamic dimension). Compares equal only to Dims, as a conservative stand-in:
    convert with tuple() before comparing with tuples."""

    def __init__(self, shape: Sequence[int] = ()) -> None:
        self._dims = tuple(int(d) for d in shape)

    def __len__(self) -> int:
        return len(self._dims)

    def __iter__(self) -> Iterator[int]:
        return iter(self._dims)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...
    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        return self._dims[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dims) and other._dims == self._dims

    def __hash__(self) -> int:
        return hash(self._dims)

    def __repr__(self) -> str:
        return repr(self._dims)


class ILogger:
    """TensorRT's logger interface: subclass it and override `log`."""

    class Severity(enum.IntEnum):
        """Message severities, most severe first."""

        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    INTERNAL_ERROR = Severity.INTERNAL_ERROR
    ERROR = Severity.ERROR
    WARNING = Severity.WARNING
    INFO = Severity.INFO
    VERBOSE = Severity.VERBOSE

    def __init__(self) -> None:
        pass

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        """Receive one message (the base class drops it)."""


class Logger(ILogger):
    """TensorRT's built-in logger: messages at `min_severity` or more severe go to Python logging."""

    def __init__(self, min_severity: ILogger.Severity = ILogger.Severity.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity: ILogger.Severity, msg: str) -> None:
        """Forward the message to the `tests.gpu_simulator.tensorrt` Python logger."""
        if severity <= self.min_severity:
            _log.log(_LEVELS.get(severity, logging.DEBUG), "[TRT] %s", msg)


_LEVELS = {
    ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
    ILogger.Severity.ERROR: logging.ERROR,
    ILogger.Severity.WARNING: logging.WARNING,
    ILogger.Severity.INFO: logging.INFO,
}


class IHostMemory(bytes):
    """A serialized engine or timing cache: a buffer (bytes(), memoryview(), file.write() all take it).

    Like TensorRT's, it offers only the buffer protocol, `nbytes` and `dtype`: len(), indexing, iteration and
    comparison with bytes fail or differ here too, so code that relies on them fails in tests, not on a GPU.
    """

    def __len__(self) -> int:
        raise TypeError("object of type 'IHostMemory' has no len(): use .nbytes")

    def __iter__(self) -> Iterator[int]:
        raise TypeError("'IHostMemory' object is not iterable: use bytes(...) or memoryview(...)")

    def __getitem__(self, index: object) -> Any:
        raise TypeError("'IHostMemory' object is not subscriptable: use bytes(...) or memoryview(...)")

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__

    @property
    def nbytes(self) -> int:
        """The size in bytes."""
        return memoryview(self).nbytes

    @property
    def dtype(self) -> DataType:
        """The element type (bytes)."""
        return DataType.UINT8


@dataclass(eq=False, slots=True)
class TrtContext:
    """What the fake TensorRT classes of one simulator share."""

    state: SimState
    memory: Memory
    scheduler: Scheduler
    cudart: CudaRuntime

    def log(self, logger: ILogger, severity: ILogger.Severity, message: str) -> None:
        """Send a message to the caller's logger, keeping errors in `SimState.errors`."""
        if severity <= ILogger.Severity.ERROR:
            self.state.errors.append(message)
        logger.log(severity, message)

    def error(self, logger: ILogger, message: str) -> None:
        """Log an ERROR, as TensorRT does before returning None/False."""
        self.log(logger, ILogger.Severity.ERROR, message)
