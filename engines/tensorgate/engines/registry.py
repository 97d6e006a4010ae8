"""Which engine class serves which platform.

Engines register by platform name (Triton's names, as `config.pbtxt` spells them) with the import path of
their class, so an engine's heavy dependencies (onnxruntime, tensorrt) load only when a model needs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from tensorgate.engines.base import Engine, EngineError, EngineSettings, EngineUnavailableError

__all__ = [
    "EngineRegistration",
    "create_engine",
    "platform_for_backend",
    "register_engine",
    "registered_platforms",
    "registration",
]


@dataclass(frozen=True, slots=True)
class EngineRegistration:
    """How to find and build the engine for one platform."""

    platform: str
    backend: str
    # "package.module:ClassName"; the class is called with an EngineSettings.
    target: str
    # The file a version directory holds when config.pbtxt names none.
    default_filename: str
    # The platform that serves the model instead when this engine cannot run here (tensorgate.engines.fallback).
    fallback: str | None = None


_REGISTRY: dict[str, EngineRegistration] = {}


def register_engine(
    platform: str, *, backend: str, target: str, default_filename: str, fallback: str | None = None
) -> None:
    """Make `platform` servable by the class at `target` ("module:Class"), and by `fallback`'s engine when it
    cannot run here."""
    _REGISTRY[platform] = EngineRegistration(platform, backend, target, default_filename, fallback)


def registered_platforms() -> list[str]:
    """Every platform name that has an engine."""
    return sorted(_REGISTRY)


def registration(platform: str) -> EngineRegistration:
    """The registration of `platform`; EngineError naming the known platforms when there is none."""
    try:
        return _REGISTRY[platform]
    except KeyError:
        known = ", ".join(registered_platforms())
        raise EngineError(f"no engine for platform {platform!r} (known: {known})") from None


def platform_for_backend(backend: str) -> str:
    """The platform name of a Triton-style `backend` ("onnxruntime" -> "onnxruntime_onnx")."""
    for entry in _REGISTRY.values():
        if entry.backend == backend:
            return entry.platform
    known = ", ".join(sorted(entry.backend for entry in _REGISTRY.values()))
    raise EngineError(f"no engine for backend {backend!r} (known: {known})")


def create_engine(platform: str, settings: EngineSettings) -> Engine:
    """Build (not yet load) the engine for `platform`."""
    module_name, _, class_name = registration(platform).target.partition(":")
    try:
        factory: Callable[[EngineSettings], Engine] = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        raise EngineUnavailableError(f"the engine for platform {platform!r} cannot be imported: {exc}") from exc
    return factory(settings)


register_engine(
    "onnxruntime_onnx",
    backend="onnxruntime",
    target="tensorgate.engines.onnxruntime:OnnxRuntimeEngine",
    default_filename="model.onnx",
)
register_engine(
    "tensorrt_plan",
    backend="tensorrt",
    target="tensorgate.engines.tensorrt:TensorRTEngine",
    default_filename="model.plan",
    fallback="onnxruntime_onnx",
)
