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
    plan_cache: str = _setting(
        "", "Directory where TensorRT plans built at load are cached; empty means ~/.cache/tensorgate/plans."
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

    # Security
    tls_cert: str = _setting(
        "", "PEM file of the server's certificate chain; with tls_key, the server speaks only TLS. Empty: plaintext."
    )
    tls_key: str = _setting("", "PEM file of the server's private key (unencrypted); goes with tls_cert.")
    tls_client_ca: str = _setting(
        "",
        "PEM file of the CAs that sign client certificates; set: every client must present one (mutual TLS). "
        "Needs tls_cert and tls_key.",
    )
    # Not in repr: settings may be logged, the token must not be.
    auth_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "Bearer token that state-changing calls (model load/unload) must carry as metadata "
            "'authorization: Bearer <token>'. Prefer auth_token_file: flags and variables are easier to leak."
        },
    )
    auth_token_file: str = _setting("", "File holding the bearer token (one line), instead of auth_token.")
    admin_identities: str = _setting(
        "",
        "Comma-separated client-certificate names (subject CN or SAN) allowed the state-changing calls without a "
        "token; needs tls_client_ca.",
    )
    auth_inference: bool = _setting(
        False,
        "Also require the token or an admin identity for inference and model listings/metadata (health checks, "
        "reflection and readiness probes stay open). False: only state-changing calls are guarded.",
    )

    # Scale-out
    workers: int = _setting(
        1,
        "Server processes sharing the address (SO_REUSEPORT; Linux), each with its own engines; the parent "
        "forwards signals and serves every worker's metrics, summed, on --metrics-address. A worker that dies "
        "stops them all (exit 1), so the supervisor restarts the whole set.",
    )

    # Overload and limits
    rate_limit: float = _setting(
        0.0,
        "Requests per second each client may make to the inference calls (Predict, ModelInfer; a stream counts "
        "once, when it opens); past it RESOURCE_EXHAUSTED with a retry hint. 0 means no limit.",
    )
    rate_limit_burst: int = _setting(
        0, "Requests a client may make at once before rate_limit paces it; 0 means rate_limit's (at least 1)."
    )
    rate_limit_key: str = _setting(
        "x-client-id", "Metadata entry naming the client for rate_limit; without it, the peer's address is the client."
    )
    breaker_failures: int = _setting(
        5,
        "Consecutive batches failed by the engine (INTERNAL; a batch counts once, however many requests it held) that "
        "take a model version out of rotation: its calls "
        "get UNAVAILABLE and its health NOT_SERVING until a trial request succeeds. 0 turns the breaker off.",
    )
    breaker_cooldown: float = _setting(
        10.0, "Seconds a version stays out of rotation before one trial request is let through."
    )
    max_streams_per_connection: int = _setting(
        0,
        "HTTP/2 streams (calls) open at once on one client connection (grpc.max_concurrent_streams); the client "
        "holds the excess until one ends. 0 means gRPC's default (no limit).",
    )
    max_frame_bytes: int = _setting(
        0,
        "Largest stream frame (Stream frame, ModelStreamInfer request), in bytes; a larger one gets a "
        "RESOURCE_EXHAUSTED result and the stream goes on. 0 means only max_message_bytes applies.",
    )
    max_request_rows: int = _setting(
        0,
        "Rows (batch dimension) one request may carry, besides each model's max_batch_size; more is "
        "INVALID_ARGUMENT. 0 means only max_batch_size applies.",
    )
    max_tensor_elements: int = _setting(
        0,
        "Elements one request tensor may have (the product of its shape), checked before it is decoded; more is "
        "INVALID_ARGUMENT naming the tensor. 0 means no limit besides max_message_bytes.",
    )

    # Reload and routing
    watch_repository: bool = _setting(
        False,
        "Rescan the repository when its files change (new, changed and removed models load, reload and unload); "
        "SIGHUP and SIGUSR2 rescan either way.",
    )
    repository_settle: float = _setting(
        1.0,
        "Seconds a changed model's files must keep their size and mtime before a rescan loads them (files still "
        "being written are not loaded half-written).",
    )

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
