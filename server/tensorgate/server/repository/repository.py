"""The model repository: Triton's layout on disk, loaded into engines and batchers, resolved per request.

    <root>/<model>/config.pbtxt          optional; derived from the model file when absent
    <root>/<model>/<version>/model.onnx  (or model.plan, or the config's default_model_filename)

One broken model never stops the others: it is listed as not ready, with the reason naming the file.
Models can be loaded (or reloaded) and unloaded one at a time while serving: `load_model`, `unload_model`;
`rescan` (on SIGHUP/SIGUSR2, or when files change with `watch`) makes the served models match the disk.
A reload fails no request except one pinned to a version the reload removes: new versions take traffic only
once loaded and warmed up, and the versions they replace drain before their engines are freed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy.typing as npt

from tensorgate.engines import Engine, EngineError, EngineSettings, registration
from tensorgate.engines.fallback import load_engine
from tensorgate.engines.registry import platform_for_backend, registered_platforms
from tensorgate.server.batching import batcher as batching
from tensorgate.server.batching.batcher import Batcher, BatcherSettings
from tensorgate.server.batching.checks import check_outputs
from tensorgate.server.errors import InvalidInputError, ModelConfigError, ModelNotFoundError, UnavailableError
from tensorgate.server.repository.config import (
    CONFIG_FILENAME,
    ModelConfig,
    ModelSignature,
    read_config,
    reconcile,
)
from tensorgate.server.repository.rescan import (
    Fingerprint,
    RescanReport,
    fingerprint,
    model_directories,
    plan_rescan,
    settle,
)
from tensorgate.server.repository.routing import RoutingHints, VersionRouter
from tensorgate.server.statistics import VersionStatistics

__all__ = ["BatchInstrumentation", "ModelEntry", "ModelVersion", "Repository", "RepositorySettings", "VersionState"]

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    plan_cache_dir: Path | None = None
    #: Seconds a changed model's files must stay unchanged before a rescan loads them.
    settle_seconds: float = 1.0
    #: Rescan when files under the root change (the `watchfiles` package).
    watch: bool = False


@dataclass(slots=True)
class ModelVersion:
    """One loaded (or failed) version of a model, with its engine and its batcher."""

    name: str
    version: int
    platform: str
    state: VersionState = VersionState.LOADING
    reason: str = ""
    #: The platform actually serving the version: `platform`, or its fallback (then `fallback_reason` says why).
    serving_platform: str = ""
    fallback_reason: str = ""
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
        """What actually serves this version ("" until loaded), and why, when it is a fallback."""
        if self.engine is None or not self.ready:
            return ""
        if self.fallback_reason:
            return f"{self.engine.description}; fallback for {self.platform}: {self.fallback_reason}"
        return self.engine.description


@dataclass(slots=True)
class ModelEntry:
    """A model directory: its versions, or the reason it could not be read at all."""

    name: str
    platform: str = ""
    reason: str = ""
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    #: Which version a request goes to (the config's `routing`).
    router: VersionRouter = field(default_factory=VersionRouter)
    #: The directory's files as last loaded (or tried); a rescan reloads the model when they differ (so a
    #: model unloaded on request stays unloaded until it is loaded again or its files change).
    fingerprint: Fingerprint | None = None

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
        return check_outputs(engine.outputs, await engine.infer(inputs, instance=instance))

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
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`sleep` waits out the settle period of rescans (tests give their own to stage a slow writer)."""
        self.root = root
        self.settings = settings or RepositorySettings()
        self._instrumentation = instrumentation
        self._models: dict[str, ModelEntry] = {}
        # One load or unload at a time: each replaces a whole entry.
        self._changing = asyncio.Lock()
        self._sleep = sleep
        self._listeners: list[Callable[[str], Awaitable[None]]] = []
        self._rescan_wanted = False
        self._rescanner: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._watch_stop: asyncio.Event | None = None
        self._closed = False
        # Loads, reloads and unloads in progress: each runs to its end even when the call that asked for it is
        # cancelled (a client's deadline), so no engine is left half-loaded and unowned; close() waits for them.
        self._changes: set[asyncio.Task[Any]] = set()
        #: Set once the file watcher is in place (`settings.watch`).
        self.watching = asyncio.Event()

    async def load(self) -> None:
        """Load every model directory, concurrently. Failures are recorded per model, never raised."""
        if not self.root.is_dir():
            raise ModelConfigError(f"{self.root}: the model repository is not a directory")
        model_dirs = sorted(model_directories(self.root).values())
        seen = await asyncio.to_thread(lambda: [fingerprint(path) for path in model_dirs])
        entries = await asyncio.gather(*(self._load_model(path) for path in model_dirs))
        for entry, files in zip(entries, seen, strict=True):
            entry.fingerprint = files
        self._models = {entry.name: entry for entry in entries}
        if self.settings.watch:
            self._start_watching()

    async def _load_model(self, model_dir: Path) -> ModelEntry:
        entry = ModelEntry(model_dir.name)
        try:
            config = read_config(model_dir)
            version_dirs = _version_dirs(model_dir)
            if not version_dirs:
                raise ModelConfigError(f"{model_dir}: no version directories (positive integers, e.g. 1/)")
            entry.platform = _platform(config, version_dirs, model_dir / CONFIG_FILENAME)
            versions = _select_versions(config, sorted(version_dirs), model_dir / CONFIG_FILENAME)
            entry.router = VersionRouter.from_config(config, versions, model_dir / CONFIG_FILENAME)
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

    def _engine_settings(
        self, platform: str, config: ModelConfig, directory: Path, has_config_file: bool
    ) -> EngineSettings:
        filename = config.default_model_filename or registration(platform).default_filename
        # As in Triton, a group that lists GPUs has `count` instances on each of them.
        devices = tuple(
            gpu for group in config.instance_group for gpu in (list(group.gpus) or [0]) for _ in range(group.count)
        )
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        threads = parameters.get("intra_op_threads", str(self.settings.intra_op_threads))
        if not threads.isdigit():
            raise ModelConfigError(f"parameter 'intra_op_threads' must be a whole number, got {threads!r}")
        return EngineSettings(
            model_file=directory / filename,
            instance_count=len(devices) or 1,
            intra_op_threads=int(threads),
            parameters=parameters,
            devices=devices,
            plan_cache_dir=self.settings.plan_cache_dir,
            # Without a config file the model batches up to the server's default when it can (see reconcile).
            max_batch_size=config.max_batch_size if has_config_file else self.settings.default_max_batch_size,
        )

    async def _load_version(
        self, entry: ModelEntry, config: ModelConfig, number: int, directory: Path, has_config_file: bool
    ) -> ModelVersion:
        version = ModelVersion(entry.name, number, entry.platform)
        engine: Engine | None = None
        batcher: Batcher | None = None
        try:
            engine_settings = self._engine_settings(entry.platform, config, directory, has_config_file)
            loaded = await load_engine(entry.platform, engine_settings)
            engine = loaded.engine
            version.serving_platform, version.fallback_reason = loaded.platform, loaded.fallback_reason
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
        except BaseException as exc:
            # Whatever went wrong, this version's engine and batcher are freed: nothing else owns them yet.
            if batcher is not None:
                await batcher.stop(drain=False)
            if engine is not None:
                await engine.close()
            if not isinstance(exc, Exception):
                raise  # cancelled: the caller goes on unwinding
            # One model's failure, whatever its kind (a bug included), never stops the others from loading.
            reason = str(exc) if isinstance(exc, EngineError | ModelConfigError | ValueError) else repr(exc)
            version.state, version.reason = VersionState.FAILED, reason
            log.error("model %s version %d failed to load: %s", entry.name, number, reason)
            return version
        version.config, version.signature, version.engine, version.batcher = (
            completed,
            signature,
            engine,
            batcher,
        )
        version.state = VersionState.READY
        log.info("model %s version %d ready on %s", entry.name, number, version.engine_description)
        return version

    async def load_model(self, name: str) -> ModelEntry:
        """Load the model directory `<root>/<name>`, or reload it when it is already loaded; return its entry.

        A reload loads every version afresh beside the serving ones; each new version takes traffic once loaded
        and warmed up, then the versions it replaces drain (queued and running requests finish) and are freed.
        A version that fails to reload leaves its previous load serving, with the reason in the listing and the
        log. Raises InvalidInputError for a name that is not a plain directory name, ModelNotFoundError when
        there is no such directory, and ModelConfigError (with the reasons) when no version could be loaded; a
        model that was serving keeps serving then.
        """
        if not name or name != Path(name).name or name.startswith("."):
            raise InvalidInputError(f"model name {name!r} is not a directory name")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFoundError(f"no model directory {name!r} in the repository {self.root}")
        fresh, entry, failures = await self._run_change(self._fingerprint_and_install(model_dir))
        await self._notify(name)
        if not fresh.ready:
            raise ModelConfigError(f"model {name!r} did not load: {failures or 'no version to load'}")
        return entry

    async def _run_change(self, change: Coroutine[Any, Any, T]) -> T:
        """Run a load, reload or unload to its end even if the caller is cancelled meanwhile."""
        task = asyncio.ensure_future(change)
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        return await asyncio.shield(task)

    async def _fingerprint_and_install(self, model_dir: Path) -> tuple[ModelEntry, ModelEntry, str]:
        async with self._changing:
            seen = await asyncio.to_thread(fingerprint, model_dir)
            return await self._install(model_dir, seen)

    async def _install(self, model_dir: Path, seen: Fingerprint) -> tuple[ModelEntry, ModelEntry, str]:
        """Load `model_dir` (fingerprinted as `seen`) beside what serves, switch over, retire what it replaces.

        Returns the fresh load, the entry now listed, and the reasons of what failed ("" when everything
        loaded). Call with `_changing` held.
        """
        name = model_dir.name
        fresh = await self._load_model(model_dir)
        fresh.fingerprint = seen
        entry, retiring, failures = _merge_reload(self._models.get(name), fresh)
        # The switch: from here on `resolve` routes to the new versions only (one assignment, no await).
        self._models[name] = entry
        if failures:
            log.error("model %s: %s", name, failures)
        # Everything routed to a retiring version reached its batcher before the switch (routing and submitting
        # happen without an await in between), so a draining stop finishes all of it and refuses nothing.
        await _retire(retiring, drain=True)
        return fresh, entry, failures

    async def unload_model(self, name: str) -> None:
        """Stop serving the model `name`: new requests get UNAVAILABLE at once, queued ones still run, then its
        engines are freed. It stays listed, with no versions and the reason "unloaded", until loaded again
        (a rescan leaves it unloaded unless its files change).

        Raises ModelNotFoundError for an unknown model.
        """
        self.model(name)  # NOT_FOUND before anything changes
        await self._run_change(self._unload(name))
        await self._notify(name)

    async def _unload(self, name: str) -> None:
        async with self._changing:
            entry = self.model(name)
            entry.reason = "unloading"  # what requests that find no ready version meanwhile are told
            await _retire(list(entry.versions.values()), drain=True)
            self._models[name] = ModelEntry(name, entry.platform, reason="unloaded", fingerprint=entry.fingerprint)

    # -- rescans -------------------------------------------------------------------------------------------

    def add_listener(self, listener: Callable[[str], Awaitable[None]]) -> None:
        """Await `listener(name)` after each model was loaded, reloaded, unloaded or removed (e.g. its health)."""
        self._listeners.append(listener)

    async def _notify(self, name: str) -> None:
        for listener in self._listeners:
            try:
                await listener(name)
            except Exception:  # a listener's bug must not undo or hide the change itself
                log.exception("model %s: a change listener failed", name)

    def request_rescan(self) -> None:
        """Ask for a rescan soon (signal handlers, the file watcher). Never blocks; call on the event loop.

        Requests made while a rescan runs coalesce into one more rescan after it.
        """
        if self._closed:
            return
        self._rescan_wanted = True
        if self._rescanner is None or self._rescanner.done():
            self._rescanner = asyncio.get_running_loop().create_task(self._rescan_while_wanted(), name="rescan")

    async def _rescan_while_wanted(self) -> None:
        while self._rescan_wanted and not self._closed:
            self._rescan_wanted = False
            try:
                await self.rescan()
            except Exception:  # the next signal or change tries again; the server keeps serving meanwhile
                log.exception("repository rescan failed")

    async def rescan(self) -> RescanReport:
        """Make the served models match the repository on disk, and say what changed.

        New model directories load, removed ones unload (and leave the listing), changed ones (any file's size
        or mtime, config.pbtxt included) reload once their files have stayed unchanged for the settle period;
        unchanged ones, and models unloaded on purpose, are left alone. Hidden and temporary names are ignored.
        """
        if not self.root.is_dir():
            raise ModelConfigError(f"{self.root}: the model repository is not a directory")
        on_disk = await asyncio.to_thread(lambda: {n: fingerprint(p) for n, p in model_directories(self.root).items()})
        loaded = {name: entry.fingerprint for name, entry in self._models.items()}
        plan = plan_rescan(loaded, on_disk)
        report = RescanReport(unchanged=list(plan.unchanged))
        # Models unloaded on purpose are in the plan only when their files changed: then they load again.
        changed = [*plan.load, *plan.reload]
        settled = await settle((self.root / name for name in changed), self.settings.settle_seconds, sleep=self._sleep)
        for name in plan.unload:
            await self._run_change(self._remove(name))
            report.unloaded.append(name)
            log.info("model %s: its directory is gone; unloaded", name)
            await self._notify(name)
        for name in changed:
            model_dir = self.root / name
            current = self._models.get(name)
            outcome = await self._run_change(self._install_if_changed(model_dir, settled[model_dir]))
            if outcome is None:
                continue
            failures = outcome[2]
            (report.reloaded if current is not None else report.loaded).append(name)
            if failures:
                report.failed[name] = failures
            await self._notify(name)
        log.info("repository rescanned: %s", report)
        return report

    async def _remove(self, name: str) -> None:
        """A model whose directory is gone: drained (its callers hear UNAVAILABLE meanwhile), then delisted."""
        async with self._changing:
            entry = self._models.get(name)
            if entry is not None:
                entry.reason = "removed from the repository"
                await _retire(list(entry.versions.values()), drain=True)
                self._models.pop(name, None)

    async def _install_if_changed(
        self, model_dir: Path, seen: Fingerprint
    ) -> tuple[ModelEntry, ModelEntry, str] | None:
        async with self._changing:
            current = self._models.get(model_dir.name)
            if current is not None and current.fingerprint == seen:
                return None  # loaded meanwhile (an RPC), or changed back: nothing left to do
            if not await asyncio.to_thread(model_dir.is_dir):
                return None  # removed meanwhile: the next rescan unloads it
            return await self._install(model_dir, seen)

    def _start_watching(self) -> None:
        from tensorgate.server.repository.watch import watch_repository

        self._watch_stop = asyncio.Event()
        self._watcher = asyncio.get_running_loop().create_task(
            watch_repository(self.root, self.request_rescan, self._watch_stop, self.watching), name="watch"
        )
        self._watcher.add_done_callback(_report_watcher_end)

    # -- requests ------------------------------------------------------------------------------------------

    def models(self) -> list[ModelEntry]:
        """Every model directory found, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def model(self, name: str) -> ModelEntry:
        """The model called `name`; ModelNotFoundError when there is none."""
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"unknown model {name!r}") from None

    def resolve(
        self,
        name: str,
        version: int | None = None,
        hints: RoutingHints | None = None,
        in_rotation: Callable[[ModelVersion], bool] | None = None,
    ) -> ModelVersion:
        """The version a request goes to: `version` if given, else the one the pin header in `hints` names, else
        the model's weighted choice (`routing` in its config), else the highest ready one.

        Unpinned requests avoid ready versions that `in_rotation` turns down (a version whose circuit breaker is
        open) while another ready version takes them; a pinned request goes where it is pinned.

        NOT_FOUND for an unknown model or version; UNAVAILABLE when the version exists but is not ready;
        INVALID_ARGUMENT for a pin header that is not a version number.
        """
        entry = self.model(name)
        router = entry.router
        if not version and hints is not None:
            version = router.pinned(hints)
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
        if router.weights:
            ready = {number: v.ready for number, v in entry.versions.items()}
            if in_rotation is not None:
                rotating = {n: is_ready and in_rotation(entry.versions[n]) for n, is_ready in ready.items()}
                if any(rotating.values()):
                    ready = rotating
            chosen = router.choose(ready, hints)
            if chosen is not None:
                return entry.versions[chosen]
        else:
            # The common case, on every request: the highest ready version in rotation, else the highest ready.
            out_of_rotation: ModelVersion | None = None
            for number in sorted(entry.versions, reverse=True):
                candidate = entry.versions[number]
                if candidate.ready:
                    if in_rotation is None or in_rotation(candidate):
                        return candidate
                    out_of_rotation = out_of_rotation or candidate
            if out_of_rotation is not None:
                return out_of_rotation
        reason = entry.reason or "; ".join(v.reason for v in entry.versions.values() if v.reason) or "loading"
        raise UnavailableError(f"model {name!r} has no ready version: {reason}")

    async def close(self, *, drain: bool = True) -> None:
        """Stop watching and rescanning, stop every batcher (finishing queued work when `drain`), free engines."""
        self._closed = True
        if self._watch_stop is not None:
            self._watch_stop.set()
        for task in (self._watcher, self._rescanner):
            if task is not None and not task.done():
                task.cancel()
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        # Changes already under way finish first (they own engines nobody else would free).
        await asyncio.gather(*self._changes, return_exceptions=True)
        async with self._changing:
            await _retire([v for entry in self._models.values() for v in entry.versions.values()], drain=drain)


def _report_watcher_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the repository watcher stopped: %s", task.exception())


def _failures(entry: ModelEntry) -> str:
    if entry.reason:
        return entry.reason
    return "; ".join(f"version {n}: {v.reason}" for n, v in sorted(entry.versions.items()) if not v.ready)


def _merge_reload(old: ModelEntry | None, fresh: ModelEntry) -> tuple[ModelEntry, list[ModelVersion], str]:
    """What to list after loading `fresh` beside `old`: (the entry, the old versions to retire, what failed).

    Per version, a fresh load that is ready replaces the old one; one that failed leaves the old one serving
    (its reason says so). When nothing fresh is ready, everything old keeps serving. Old versions the fresh
    load no longer selects (version_policy, removed directories) retire, unless nothing fresh is ready.
    """
    failures = _failures(fresh)
    if old is None or not old.ready:
        return fresh, [], failures
    kept_note = f"reload failed, the previous load still serves: {failures}"
    if not fresh.ready:
        versions = dict(old.versions)
        for number, version in fresh.versions.items():
            versions.setdefault(number, version)  # a failed new version: listed, with its reason
        for version in old.versions.values():
            if version.ready:
                version.reason = kept_note
        kept = ModelEntry(
            old.name,
            old.platform,
            reason=kept_note,
            versions=versions,
            router=old.router,
            fingerprint=fresh.fingerprint,
        )
        return kept, [], failures
    versions = {}
    retiring = [version for number, version in old.versions.items() if number not in fresh.versions]
    for number, version in fresh.versions.items():
        previous = old.versions.get(number)
        if version.ready or previous is None or not previous.ready:
            versions[number] = version
            if previous is not None:
                retiring.append(previous)
        else:
            previous.reason = f"reload failed, the previous load still serves: {version.reason}"
            versions[number] = previous
    entry = ModelEntry(
        fresh.name, fresh.platform, reason="", versions=versions, router=fresh.router, fingerprint=fresh.fingerprint
    )
    return entry, retiring, failures
