"""The engine chain: each model is served by the engine its config asks for, or by its fallback when that engine
cannot run here.

TensorRT needs its library, a GPU and a plan that this TensorRT and this GPU accept (or can build). When any of
those is missing (the engine raises EngineUnavailableError), a `tensorrt_plan` model is served by ONNX Runtime
from the `model.onnx` beside the plan, with the TensorRT and CUDA execution providers when this onnxruntime build
has them, else on CPU. A model whose config sets the parameter `fallback: "none"` fails to load instead, for
deployments where a silent slowdown is worse than an outage. Other failures (a bad parameter, a GPU that does not
exist, CUDA out of memory) are the config's or the machine's to fix: they fail the load instead of hiding behind
a fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from tensorgate.engines.base import Engine, EngineError, EngineSettings, EngineUnavailableError
from tensorgate.engines.registry import create_engine, registration

__all__ = ["FALLBACK_PARAMETER", "LoadedEngine", "load_engine"]

log = logging.getLogger(__name__)

#: The config parameter that chooses what happens when the configured engine cannot run.
FALLBACK_PARAMETER = "fallback"
_FALLBACK_CHOICES = ("onnxruntime", "none")


@dataclass(frozen=True, slots=True)
class LoadedEngine:
    """A loaded engine, which platform it is, and why it is not the configured one ("" when it is)."""

    engine: Engine
    platform: str
    fallback_reason: str = ""


async def _load(platform: str, settings: EngineSettings) -> Engine:
    engine = create_engine(platform, settings)
    try:
        await engine.load()
    except BaseException:
        await engine.close()
        raise
    return engine


async def load_engine(platform: str, settings: EngineSettings) -> LoadedEngine:
    """Create and load the engine for `platform`, falling back as the module docstring says.

    Raises EngineError when neither the engine nor its fallback can serve the model; the message gives both
    reasons.
    """
    choice = settings.parameters.get(FALLBACK_PARAMETER, _FALLBACK_CHOICES[0])
    if choice not in _FALLBACK_CHOICES:
        raise EngineError(
            f"parameter {FALLBACK_PARAMETER!r} is {choice!r}; it must be one of {', '.join(_FALLBACK_CHOICES)}"
        )
    entry = registration(platform)
    try:
        return LoadedEngine(await _load(platform, settings), platform)
    except EngineUnavailableError as exc:
        if entry.fallback is None:
            raise
        reason = str(exc)
        if choice == "none":
            raise EngineError(f'{reason} (and the config\'s {FALLBACK_PARAMETER}: "none" forbids a fallback)') from exc
    fallback = registration(entry.fallback)
    model_file = settings.model_file.with_name(fallback.default_filename)
    if not model_file.is_file():
        raise EngineError(f"{reason}; no {model_file.name} beside it to serve with {fallback.backend} instead")
    log.warning(
        "%s cannot be served by %s (%s); serving %s with %s instead",
        settings.model_file,
        entry.backend,
        reason,
        model_file,
        fallback.backend,
    )
    try:
        engine = await _load(fallback.platform, replace(settings, model_file=model_file))
    except EngineError as exc:
        raise EngineError(f"{reason}; the {fallback.backend} fallback failed too: {exc}") from exc
    return LoadedEngine(engine, fallback.platform, reason)
