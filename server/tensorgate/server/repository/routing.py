"""Which served version a request goes to: a pin, else a weighted (canary) split, else the highest ready version.

A model's `routing` config (`VersionRouting` in model_config.proto, tensorgate's own field 1001) names weights
per version, the header that pins a version and the header whose value keys a deterministic choice:

    routing {
      weights { key: 1 value: 90 }
      weights { key: 2 value: 10 }
      pin_header: "x-tensorgate-version"   # the default
      key_header: "x-client-id"            # the default
    }

Precedence, highest first: the request's own version (Predict `version`, OIP `model_version` or its request
parameter "version"), the pin header, the weighted choice, the highest ready version. A weighted choice with a
routing key is a pure function of the key and the set of ready weighted versions (a stable hash, not Python's
salted `hash`), so one client keeps landing on one version while nothing changes; without a key it is random.
Versions that are not ready are skipped; when no weighted version is ready, the highest ready version serves.

Nothing here imports grpc: the API adapters hand the call's metadata over as `RoutingHints`.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorgate.server.errors import InvalidInputError, ModelConfigError
from tensorgate.v1 import model_config_pb2

__all__ = [
    "DEFAULT_KEY_HEADER",
    "DEFAULT_PIN_HEADER",
    "RoutingHints",
    "VersionRouter",
    "routing_hints",
    "weighted_choice",
]

#: The metadata header that pins a version when the model's config names none.
DEFAULT_PIN_HEADER = "x-tensorgate-version"
#: The metadata header whose value keys the weighted choice when the model's config names none.
DEFAULT_KEY_HEADER = "x-client-id"

# gRPC metadata keys: lowercase letters, digits, "-", "_", "."; "grpc-" is reserved and "-bin" means binary.
_HEADER = re.compile(r"[0-9a-z_.\-]+")
_SCALE = float(1 << 64)


@dataclass(frozen=True, slots=True)
class RoutingHints:
    """What a call says about routing: its metadata headers (as the adapter received them, text ones only read)."""

    metadata: Sequence[tuple[str, Any]] = ()

    def header(self, name: str) -> str | None:
        """The first value of the text header `name` (lowercase), or None."""
        for key, value in self.metadata:
            if key == name and isinstance(value, str):
                return value
        return None


def routing_hints(metadata: Iterable[tuple[str, Any]] | None) -> RoutingHints | None:
    """Hints from a call's invocation metadata (None when it has none); cheap: the pairs are kept, not parsed."""
    if not metadata:
        return None
    return RoutingHints(metadata if isinstance(metadata, tuple) else tuple(metadata))


def _unit(key: str) -> float:
    """A stable point in [0, 1) for a routing key, the same in every process and run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def weighted_choice(
    weights: Sequence[tuple[int, int]], key: str | None = None, rng: random.Random | None = None
) -> int | None:
    """One version of `(version, weight)` pairs, in proportion to the weights; None when every weight is 0.

    With `key`, the choice is deterministic (a stable hash of the key); without it, drawn from `rng` (the
    module's generator by default). Pairs are taken in the order given; callers pass them sorted by version.
    """
    total = sum(weight for _, weight in weights if weight > 0)
    if total <= 0:
        return None
    point = (_unit(key) if key is not None else (rng or random).random()) * total
    for version, weight in weights:
        if weight <= 0:
            continue
        if point < weight:
            return version
        point -= weight
    # Float rounding at the very top of the range: the last positive weight.
    return next(version for version, weight in reversed(weights) if weight > 0)


def _check_header(name: str, what: str, where: str) -> str:
    if not _HEADER.fullmatch(name) or name.startswith("grpc-") or name.endswith("-bin"):
        raise ModelConfigError(
            f"{where}: routing {what} {name!r} is not a usable gRPC metadata key (lowercase letters, digits, "
            "'-', '_', '.'; not starting with 'grpc-' nor ending with '-bin')"
        )
    return name


def _line_of(path: Path, patterns: Sequence[str]) -> str:
    """`path:line` of the first line matching the patterns in turn (each searched after the previous match)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return str(path)
    position = 0
    for pattern in patterns:
        found = re.compile(pattern).search(text, position)
        if found is None:
            break
        position = found.start()
    return f"{path}:{text.count(chr(10), 0, position) + 1}" if position else str(path)


@dataclass(frozen=True, slots=True)
class VersionRouter:
    """A model's routing rules, checked against the versions it serves (`from_config`)."""

    #: (version, weight) sorted by version; empty: the highest ready version takes unpinned requests.
    weights: tuple[tuple[int, int], ...] = ()
    pin_header: str = DEFAULT_PIN_HEADER
    key_header: str = DEFAULT_KEY_HEADER
    _weighted: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_weighted", frozenset(version for version, _ in self.weights))

    @classmethod
    def from_config(
        cls, config: model_config_pb2.ModelConfig, served: Iterable[int], config_file: Path
    ) -> VersionRouter:
        """The router of `config`; ModelConfigError naming `config_file:line` for weights naming versions that
        are not served, weights that are all 0, or header names gRPC cannot carry."""
        if not config.HasField("routing"):
            return cls()
        routing = config.routing
        where = str(config_file)
        pin = _check_header(routing.pin_header.lower(), "pin_header", where) if routing.pin_header else None
        key = _check_header(routing.key_header.lower(), "key_header", where) if routing.key_header else None
        weights = tuple(sorted(routing.weights.items()))
        served_set = set(served)
        for version, _ in weights:
            if version not in served_set:
                listed = ", ".join(str(v) for v in sorted(served_set)) or "none"
                line = _line_of(config_file, [r"\brouting\b", rf"\bkey\s*:\s*{version}\b"])
                raise ModelConfigError(
                    f"{line}: routing weights name version {version}, which is not served (served versions: "
                    f"{listed}; see version_policy)"
                )
        if weights and not any(weight > 0 for _, weight in weights):
            line = _line_of(config_file, [r"\brouting\b", r"\bweights\b"])
            raise ModelConfigError(f"{line}: routing weights are all 0; at least one version needs a weight above 0")
        return cls(weights, pin or DEFAULT_PIN_HEADER, key or DEFAULT_KEY_HEADER)

    def pinned(self, hints: RoutingHints | None) -> int | None:
        """The version the pin header asks for, if any; InvalidInputError for a value that is not a version."""
        if hints is None:
            return None
        text = hints.header(self.pin_header)
        if text is None or not text.strip():
            return None
        text = text.strip()
        if not (text.isascii() and text.isdigit()) or int(text) == 0:
            raise InvalidInputError(
                f"header {self.pin_header!r} is {text!r}, not a version number (a positive integer)"
            )
        return int(text)

    def choose(
        self, ready: Mapping[int, bool], hints: RoutingHints | None, rng: random.Random | None = None
    ) -> int | None:
        """The version an unpinned request goes to, of the versions in `ready` (number -> whether it is ready).

        None when no version is ready.
        """
        if self.weights:
            candidates = [(version, weight) for version, weight in self.weights if ready.get(version, False)]
            key = hints.header(self.key_header) if hints is not None else None
            chosen = weighted_choice(candidates, key, rng)
            if chosen is not None:
                return chosen
        for version in sorted(ready, reverse=True):
            if ready[version]:
                return version
        return None
