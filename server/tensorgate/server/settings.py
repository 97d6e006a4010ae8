"""Server settings: command-line flags over TENSORGATE_* environment variables over a TOML file over defaults."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ENV_PREFIX", "ServerSettings"]

ENV_PREFIX = "TENSORGATE_"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _boolean(value: Any) -> bool:
    """A bool from a flag, a variable or TOML: true/false, yes/no, on/off, 1/0 (bool("false") would be True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(value)


def _setting(default: Any, help_text: str) -> Any:
    """A settings field with its help text (shown by `tensorgate serve --help`)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything the server can be told. Each field is also `--flag-name` and `TENSORGATE_FIELD_NAME`."""

    address: str = _setting(
        "127.0.0.1:8001", "HOST:PORT to listen on; port 0 picks a free port (the chosen address is printed)."
    )
    repository: Path = _setting(
        Path("models"),
        "The model repository (Triton layout: <repo>/<model>/[config.pbtxt] and <repo>/<model>/<version>/).",
    )
    grace_period: float = _setting(
        30.0, "Seconds in-flight calls get to finish after SIGTERM before they are cancelled."
    )
    max_message_bytes: int = _setting(
        64 * 1024 * 1024,
        "Largest request or response message, in bytes; a larger one is refused with RESOURCE_EXHAUSTED.",
    )
    max_queue_size: int = _setting(
        1024, "Queue bound for models whose config leaves max_queue_size at 0 (the queue is always bounded)."
    )
    default_max_batch_size: int = _setting(
        64, "max_batch_size given to models that have no config.pbtxt but a variable first dimension."
    )
    intra_op_threads: int = _setting(
        0, "Threads each ONNX Runtime instance may use for one operator; 0 lets ONNX Runtime choose."
    )
    max_concurrent_rpcs: int = _setting(
        0, "Calls served at once; the excess is refused with RESOURCE_EXHAUSTED. 0 means no limit."
    )
    max_streams: int = _setting(
        256,
        "Camera/frame streams served at once; a stream past it is refused with RESOURCE_EXHAUSTED. 0 means no limit.",
    )
    log_level: str = _setting("INFO", "Python logging level name.")
    log_format: str = _setting(
        "text", 'Log line format: "text" or "json" (one object per line, with trace id, span id and request id).'
    )
    access_log: bool = _setting(
        False, "One log line per call (logger `tensorgate.access`): peer, method, status, duration, model, ids."
    )
    metrics_address: str = _setting(
        "", "HOST:PORT of the Prometheus /metrics endpoint; empty: no metrics; port 0 picks a free port (printed)."
    )
    tracing: bool = _setting(
        False, "OpenTelemetry tracing; exporters from OTEL_* (OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_*)."
    )
    trace_sample_ratio: float = _setting(
        1.0, "Share of traces started here (calls without a sampled `traceparent`) that are recorded, 0..1."
    )
    trace_frame_ratio: float = _setting(0.01, "Share of a traced stream's frames that get a span of their own, 0..1.")

    @classmethod
    def field_names(cls) -> list[str]:
        """Every setting's name."""
        return [f.name for f in fields(cls)]

    def with_values(self, values: Mapping[str, Any]) -> ServerSettings:
        """A copy with `values` (by field name, strings or typed) applied, each converted to the field's type."""
        converted: dict[str, Any] = {}
        defaults = ServerSettings()
        for name, value in values.items():
            if name not in self.field_names():
                raise ValueError(f"unknown setting {name!r} (known: {', '.join(self.field_names())})")
            kind = type(getattr(defaults, name))
            try:
                converted[name] = _boolean(value) if kind is bool else kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"setting {name!r}: {value!r} is not a valid {kind.__name__}") from None
        return replace(self, **converted)

    @classmethod
    def from_sources(
        cls,
        flags: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> ServerSettings:
        """Defaults, then the TOML file, then TENSORGATE_* variables, then the flags that were given."""
        settings = cls()
        if config_file is not None:
            with config_file.open("rb") as handle:
                settings = settings.with_values(tomllib.load(handle))
        env = os.environ if environ is None else environ
        from_env = {
            name: env[ENV_PREFIX + name.upper()] for name in cls.field_names() if ENV_PREFIX + name.upper() in env
        }
        settings = settings.with_values(from_env)
        return settings.with_values({name: value for name, value in flags.items() if value is not None})
