"""Rescanning the repository: what is on disk, compared with what is loaded, and when a change has settled.

A model directory's *fingerprint* is the (relative path, size, mtime in ns) of every file in it that is not
being written by a careful publisher: names starting with "." and temporary names (`*.tmp`, `*.part`, `*.swp`,
`*~`, ...) are skipped, in any folder, and so is everything under such a folder. Comparing fingerprints decides
what a rescan does (`plan_rescan`): new directories load, removed ones unload, changed ones reload, unchanged
ones are left alone. Before loading what changed, `settle` waits until the fingerprint stays the same over a
settle period, so a file still being copied in place is not loaded half-written.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Fingerprint",
    "RescanPlan",
    "RescanReport",
    "fingerprint",
    "ignored_name",
    "model_directories",
    "plan_rescan",
    "settle",
]

#: (path relative to the model directory, size in bytes, mtime in ns) of every file that counts, sorted.
Fingerprint = tuple[tuple[str, int, int], ...]

_TEMPORARY_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".swp", ".swx", ".crdownload", ".download", "~")


def ignored_name(name: str) -> bool:
    """Whether a file or folder name is hidden or temporary: never loaded, never a reason to rescan."""
    return name.startswith((".", "#")) or name.lower().endswith(_TEMPORARY_SUFFIXES)


def model_directories(root: Path) -> dict[str, Path]:
    """The model directories directly under `root`, by name (hidden and temporary ones skipped)."""
    return {p.name: p for p in root.iterdir() if p.is_dir() and not ignored_name(p.name)}


def fingerprint(model_dir: Path) -> Fingerprint:
    """What a model directory holds now; a file that vanishes while being read is simply left out."""
    found: list[tuple[str, int, int]] = []
    for folder, subfolders, files in os.walk(model_dir):
        subfolders[:] = sorted(name for name in subfolders if not ignored_name(name))
        for name in files:
            if ignored_name(name):
                continue
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError:  # removed or renamed meanwhile: the next look decides
                continue
            found.append((path.relative_to(model_dir).as_posix(), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))


@dataclass(frozen=True, slots=True)
class RescanPlan:
    """What a rescan does, by model name (each list sorted)."""

    load: list[str] = field(default_factory=list)
    reload: list[str] = field(default_factory=list)
    unload: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.load or self.reload or self.unload)


def plan_rescan(loaded: Mapping[str, Fingerprint | None], on_disk: Mapping[str, Fingerprint]) -> RescanPlan:
    """Compare the fingerprints the loaded models were loaded from with the disk's.

    `loaded` maps each model the repository lists to the fingerprint of its last load attempt (None: never
    loaded from disk, which always reloads).
    """
    plan = RescanPlan()
    for name in sorted(on_disk):
        if name not in loaded:
            plan.load.append(name)
        elif loaded[name] != on_disk[name]:
            plan.reload.append(name)
        else:
            plan.unchanged.append(name)
    plan.unload.extend(sorted(set(loaded) - set(on_disk)))
    return plan


@dataclass(slots=True)
class RescanReport:
    """What a rescan did, by model name; `failed` holds the models whose (re)load did not take, with why."""

    loaded: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [
            f"{what} {', '.join(names)}"
            for what, names in (("loaded", self.loaded), ("reloaded", self.reloaded), ("unloaded", self.unloaded))
            if names
        ]
        parts += [f"{name} failed ({reason})" for name, reason in sorted(self.failed.items())]
        return "; ".join(parts) or "nothing changed"


async def settle(
    model_dirs: Iterable[Path],
    period: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    max_rounds: int = 60,
) -> dict[Path, Fingerprint]:
    """Wait until every directory's fingerprint is the same before and after `period` seconds; return them.

    A directory still changing after `max_rounds` periods is returned as last seen (a writer that never stops
    must not block every other change); a broken load then keeps the old version serving. `period` <= 0
    returns at once.
    """
    dirs = list(model_dirs)
    if not dirs:
        return {}
    seen = {path: await asyncio.to_thread(fingerprint, path) for path in dirs}
    if period <= 0:
        return seen
    for _ in range(max_rounds):
        await sleep(period)
        now = {path: await asyncio.to_thread(fingerprint, path) for path in dirs}
        if now == seen:
            return now
        seen = now
    return seen
