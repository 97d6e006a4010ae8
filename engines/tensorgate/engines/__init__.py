"""Engines run whole batches of tensors: ONNX Runtime everywhere, TensorRT on NVIDIA GPUs."""

from tensorgate.engines.base import (
    Engine,
    EngineError,
    EngineInputError,
    EngineSettings,
    EngineUnavailableError,
    TensorSpec,
)
from tensorgate.engines.registry import create_engine, register_engine, registered_platforms, registration

__all__ = [
    "Engine",
    "EngineError",
    "EngineInputError",
    "EngineSettings",
    "EngineUnavailableError",
    "TensorSpec",
    "create_engine",
    "register_engine",
    "registered_platforms",
    "registration",
]
