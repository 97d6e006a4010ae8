"""`tensorgate serve`: run the server until SIGTERM or Ctrl-C, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from tensorgate.server.app import Server
from tensorgate.server.errors import TensorgateError
from tensorgate.server.settings import ENV_PREFIX, ServerSettings
from tensorgate.server.telemetry.logging import configure as configure_logging

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorgate serve",
        description="Serve a model repository over gRPC. Every flag can also be set as TENSORGATE_<NAME> "
        "(e.g. TENSORGATE_ADDRESS) or in a TOML file given with --config; flags win over the environment, which "
        "wins over the file.",
    )
    parser.add_argument("--config", type=Path, help="TOML file of settings (keys as the flags, with _)")
    defaults = ServerSettings()
    for field in fields(ServerSettings):
        doc = _FIELD_HELP.get(field.name, "")
        # A bare boolean flag (--tracing) means true; --tracing false also works, like the variable.
        switch = {"nargs": "?", "const": "true"} if isinstance(getattr(defaults, field.name), bool) else {}
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            default=None,
            metavar=field.name.upper(),
            **switch,  # type: ignore[arg-type]
            help=f"{doc} [env {ENV_PREFIX}{field.name.upper()}; default {getattr(defaults, field.name)}]",
        )
    return parser


_FIELD_HELP = {
    "address": "HOST:PORT to listen on; port 0 picks a free port",
    "repository": "model repository directory (Triton layout)",
    "grace_period": "seconds in-flight calls get to finish on SIGTERM",
    "max_message_bytes": "largest request/response message in bytes",
    "max_queue_size": "queue bound for models whose config sets none",
    "default_max_batch_size": "max_batch_size for models without config.pbtxt",
    "intra_op_threads": "ONNX Runtime threads per instance per operator (0: its choice)",
    "max_concurrent_rpcs": "calls served at once, the rest refused (0: no limit)",
    "max_streams": "Stream calls served at once, the rest refused (0: no limit)",
    "log_level": "logging level",
    "log_format": "log lines as text or json (with trace id, span id, request id)",
    "access_log": "one log line per call (logger tensorgate.access)",
    "metrics_address": "HOST:PORT of the Prometheus /metrics endpoint; empty: off; port 0 picks a free port",
    "tracing": "OpenTelemetry tracing, exported per OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_*",
    "trace_sample_ratio": "share of new traces recorded (a caller's sampled traceparent is always followed)",
    "trace_frame_ratio": "share of a traced stream's frames that get their own span",
}


def _describe(server: Server) -> list[str]:
    lines = [f"tensorgate listening on {server.address}"]
    for entry in server.repository.models():
        if not entry.versions:
            lines.append(f"  {entry.name}: NOT READY: {entry.reason}")
        for version in entry.versions.values():
            detail = version.engine_description if version.ready else version.reason
            lines.append(f"  {entry.name} version {version.version}: {version.state.value} ({detail})")
    lines += [f"  {note}" for note in server.telemetry.notes]
    return lines


async def _serve(settings: ServerSettings) -> int:
    try:
        server = Server(settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        await server.start()
    except (OSError, ValueError, TensorgateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        await server.repository.close(drain=False)
        return 2
    print("\n".join(_describe(server)), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    print(f"tensorgate draining (grace period {settings.grace_period:g}s)", flush=True)
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags (over TENSORGATE_* and --config), serve until SIGTERM/Ctrl-C, return the exit code."""
    args = vars(_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        settings = ServerSettings.from_sources(args, config_file=config_file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        configure_logging(settings.log_level, settings.log_format)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(settings))


if __name__ == "__main__":
    sys.exit(main())
