"""The model repository: Triton's layout on disk, loaded into engines and batchers, resolved per request.

    <root>/<model>/config.pbtxt          optional; derived from the model file when absent
    <root>/<model>/<version>/model.onnx  (or model.plan, or the config's default_model_filename)

One broken model never stops the others: it is listed as not ready, with the reason naming the file.
Models can be loaded (or reloaded) and unloaded one at a time while serving: `load_model`, `unload_model`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from tensorgate.engines import Engine, EngineError, EngineSettings, create_engine, registration
from tensorgate.engines.registry import platform_for_backend, registered_platforms
from tensorgate.server.batching import batcher as batching
from tensorgate.server.batching.batcher import Batcher, BatcherSettings
from tensorgate.server.errors import InvalidInputError, ModelConfigError, ModelNotFoundError, UnavailableError
from tensorgate.server.repository.config import (
    CONFIG_FILENAME,
    ModelConfig,
    ModelSignature,
    read_config,
    reconcile,
)
from tensorgate.server.statistics import VersionStatistics

__all__ = ["BatchInstrumentation", "ModelEntry", "ModelVersion", "Repository", "RepositorySettings", "VersionState"]

log = logging.getLogger(__name__)


class VersionState(enum.Enum):
    """Where a model version is in its life."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class RepositorySettings:
    """What the repository needs from the server's settings."""

    max_queue_size: int = 1024
    default_max_batch_size: int = 64
    intra_op_threads: int = 0


@dataclass(slots=True)
class ModelVersion:
    """One loaded (or failed) version of a model, with its engine and its batcher."""

    name: str
    version: int
    platform: str
    state: VersionState = VersionState.LOADING
    reason: str = ""
    config: ModelConfig = field(default_factory=ModelConfig)
    signature: ModelSignature | None = None
    engine: Engine | None = None
    batcher: Batcher | None = None
    statistics: VersionStatistics = field(default_factory=VersionStatistics)

    @property
    def ready(self) -> bool:
        """Whether the version takes requests."""
        return self.state is VersionState.READY

    @property
    def engine_description(self) -> str:
        """What actually serves this version ("" until loaded)."""
        return self.engine.description if self.engine is not None and self.ready else ""


@dataclass(slots=True)
class ModelEntry:
    """A model directory: its versions, or the reason it could not be read at all."""

    name: str
    platform: str = ""
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """Whether any version takes requests."""
        return any(version.ready for version in self.versions.values())


def _version_dirs(model_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for child in model_dir.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0:
            found[int(child.name)] = child
    return found


def _select_versions(config: ModelConfig, available: list[int], where: Path) -> list[int]:
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return sorted(available)
    if choice == "specific":
        missing = sorted(set(policy.specific.versions) - set(available))
        if missing:
            raise ModelConfigError(f"{where}: version_policy names versions {missing} that have no directory")
        return sorted(set(policy.specific.versions))
    count = policy.latest.num_versions if choice == "latest" and policy.latest.num_versions > 0 else 1
    return sorted(available)[-count:]


def _platform(config: ModelConfig, version_dirs: Mapping[int, Path], where: Path) -> str:
    if config.platform:
        return config.platform
    if config.backend:
        try:
            return platform_for_backend(config.backend)
        except EngineError as exc:
            raise ModelConfigError(f"{where}: {exc}") from None
    # No config says: the files decide.
    for directory in sorted(version_dirs.values(), reverse=True):
        for platform in registered_platforms():
            if (directory / registration(platform).default_filename).is_file():
                return platform
    raise ModelConfigError(
        f"{where}: no platform in the config and no version directory holds a model file this server knows"
    )


def _batcher_settings(config: ModelConfig, engine: Engine, settings: RepositorySettings) -> BatcherSettings:
    batching = config.dynamic_batching
    policy = batching.default_queue_policy
    levels = max(1, batching.priority_levels)
    return BatcherSettings(
        # Without dynamic_batching, Triton runs every request on its own; so do we.
        max_batch_size=config.max_batch_size if config.HasField("dynamic_batching") else 0,
        preferred_batch_sizes=tuple(batching.preferred_batch_size),
        max_queue_delay=batching.max_queue_delay_microseconds / 1e6,
        max_queue_size=policy.max_queue_size or settings.max_queue_size,
        priority_levels=levels,
        default_priority=batching.default_priority_level or 1,
        default_timeout=(policy.default_timeout_microseconds / 1e6) or None,
        instances=engine.instance_count,
    )


async def _retire(versions: list[ModelVersion], *, drain: bool) -> None:
    """Take ready versions out of service: stop their batchers (finishing queued work when `drain`), free engines."""
    versions = [version for version in versions if version.ready]
    for version in versions:
        version.state = VersionState.UNLOADING
    await asyncio.gather(*(v.batcher.stop(drain=drain) for v in versions if v.batcher is not None))
    await asyncio.gather(*(v.engine.close() for v in versions if v.engine is not None))


def _runner(engine: Engine) -> batching.RunBatch:
    async def run_batch(instance: int, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return await engine.infer(inputs, instance=instance)

    return run_batch


class BatchInstrumentation(Protocol):
    """Wraps each version's batch runner and batch observer (telemetry: `tensorgate.server.telemetry`)."""

    def instrument(
        self,
        model: str,
        version: int,
        engine: Engine,
        run_batch: batching.RunBatch,
        observer: batching.BatchObserver,
    ) -> tuple[batching.RunBatch, batching.BatchObserver]: ...


class Repository:
    """Loads every model under `root` and resolves requests to a ready version."""

    def __init__(
        self,
        root: Path,
        settings: RepositorySettings | None = None,
        instrumentation: BatchInstrumentation | None = None,
    ) -> None:
        self.root = root
        self.settings = settings or RepositorySettings()
        self._instrumentation = instrumentation
        self._models: dict[str, ModelEntry] = {}
        # One load or unload at a time: each replaces a whole entry.
        self._changing = asyncio.Lock()

    async def load(self) -> None:
        """Load every model directory, concurrently. Failures are recorded per model, never raised."""
        if not self.root.is_dir():
            raise ModelConfigError(f"{self.root}: the model repository is not a directory")
        model_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        entries = await asyncio.gather(*(self._load_model(path) for path in model_dirs))
        self._models = {entry.name: entry for entry in entries}

    async def _load_model(self, model_dir: Path) -> ModelEntry:
        entry = ModelEntry(model_dir.name)
        try:
            config = read_config(model_dir)
            version_dirs = _version_dirs(model_dir)
            if not version_dirs:
                raise ModelConfigError(f"{model_dir}: no version directories (positive integers, e.g. 1/)")
            entry.platform = _platform(config, version_dirs, model_dir / CONFIG_FILENAME)
            versions = _select_versions(config, sorted(version_dirs), model_dir / CONFIG_FILENAME)
        except ModelConfigError as exc:
            entry.reason = str(exc)
            log.error("model %s is not served: %s", model_dir.name, exc)
            return entry
        has_config_file = (model_dir / CONFIG_FILENAME).is_file()
        loaded = await asyncio.gather(
            *(self._load_version(entry, config, number, version_dirs[number], has_config_file) for number in versions)
        )
        entry.versions = {version.version: version for version in loaded}
        return entry

    async def _load_version(
        self, entry: ModelEntry, config: ModelConfig, number: int, directory: Path, has_config_file: bool
    ) -> ModelVersion:
        version = ModelVersion(entry.name, number, entry.platform)
        filename = config.default_model_filename or registration(entry.platform).default_filename
        instances = sum(group.count for group in config.instance_group) or 1
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        engine_settings = EngineSettings(
            model_file=directory / filename,
            instance_count=instances,
            intra_op_threads=int(parameters.get("intra_op_threads", self.settings.intra_op_threads)),
            parameters=parameters,
        )
        engine: Engine | None = None
        try:
            engine = create_engine(entry.platform, engine_settings)
            await engine.load()
            signature, completed = reconcile(
                config,
                engine.inputs,
                engine.outputs,
                where=directory.parent / CONFIG_FILENAME if has_config_file else engine_settings.model_file,
                has_config_file=has_config_file,
                default_max_batch_size=self.settings.default_max_batch_size,
            )
            await engine.warmup()
            run_batch: batching.RunBatch = _runner(engine)
            observer: batching.BatchObserver = version.statistics
            if self._instrumentation is not None:
                run_batch, observer = self._instrumentation.instrument(entry.name, number, engine, run_batch, observer)
            batcher = Batcher(
                run_batch,
                _batcher_settings(completed, engine, self.settings),
                name=entry.name,
                observer=observer,
            )
            await batcher.start()
        except (EngineError, ModelConfigError, ValueError) as exc:
            if engine is not None:
                await engine.close()
            version.state, version.reason = VersionState.FAILED, str(exc)
            log.error("model %s version %d failed to load: %s", entry.name, number, exc)
            return version
        version.config, version.signature, version.engine, version.batcher = (
            completed,
            signature,
            engine,
            batcher,
        )
        version.state = VersionState.READY
        log.info("model %s version %d ready on %s", entry.name, number, engine.description)
        return version

    async def load_model(self, name: str) -> ModelEntry:
        """Load the model directory `<root>/<name>`, or reload it when it is already loaded; return its entry.

        A reload loads every version afresh beside the serving ones, switches traffic to them, then drains and
        frees the old ones. Raises InvalidInputError for a name that is not a plain directory name,
        ModelNotFoundError when there is no such directory, and ModelConfigError (with the reasons) when no
        version could be loaded; a model that was serving keeps serving then.
        """
        if not name or name != Path(name).name or name.startswith("."):
            raise InvalidInputError(f"model name {name!r} is not a directory name")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFoundError(f"no model directory {name!r} in the repository {self.root}")
        async with self._changing:
            entry = await self._load_model(model_dir)
            old = self._models.get(name)
            if not entry.ready:
                if old is None or not old.ready:
                    self._models[name] = entry  # listed as not ready, with the reason
                reasons = entry.reason or "; ".join(v.reason for v in entry.versions.values() if v.reason)
                raise ModelConfigError(f"model {name!r} did not load: {reasons or 'no version to load'}")
            self._models[name] = entry
            if old is not None:
                await _retire(list(old.versions.values()), drain=True)
            return entry

    async def unload_model(self, name: str) -> None:
        """Stop serving the model `name`: new requests get UNAVAILABLE at once, queued ones still run, then its
        engines are freed. It stays listed, with no versions and the reason "unloaded", until loaded again.

        Raises ModelNotFoundError for an unknown model.
        """
        async with self._changing:
            entry = self.model(name)
            entry.reason = "unloading"  # what requests that find no ready version meanwhile are told
            await _retire(list(entry.versions.values()), drain=True)
            self._models[name] = ModelEntry(name, entry.platform, reason="unloaded")

    def models(self) -> list[ModelEntry]:
        """Every model directory found, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def model(self, name: str) -> ModelEntry:
        """The model called `name`; ModelNotFoundError when there is none."""
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"unknown model {name!r}") from None

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The version a request goes to: `version` if given, else the highest ready one.

        NOT_FOUND for an unknown model or version; UNAVAILABLE when the version exists but is not ready.
        """
        entry = self.model(name)
        if version:
            found = entry.versions.get(version)
            if found is None:
                served = ", ".join(str(v) for v in sorted(entry.versions)) or "none"
                raise ModelNotFoundError(f"model {name!r} has no version {version} (served versions: {served})")
            if not found.ready:
                raise UnavailableError(
                    f"model {name!r} version {version} is {found.state.value.lower()}"
                    + (f": {found.reason}" if found.reason else "")
                )
            return found
        for number in sorted(entry.versions, reverse=True):
            if entry.versions[number].ready:
                return entry.versions[number]
        reason = entry.reason or "; ".join(v.reason for v in entry.versions.values() if v.reason) or "loading"
        raise UnavailableError(f"model {name!r} has no ready version: {reason}")

    async def close(self, *, drain: bool = True) -> None:
        """Stop every batcher (finishing queued work when `drain`), then free every engine."""
        await _retire([v for entry in self._models.values() for v in entry.versions.values()], drain=drain)
