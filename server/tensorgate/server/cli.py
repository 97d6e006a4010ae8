"""`tensorgate serve`: run the server until SIGTERM or Ctrl-C, then drain and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
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
        doc = field.metadata["help"]
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


async def _serve(settings: ServerSettings, on_ready: Callable[[Server], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain; `on_ready(server)` once it listens (a `--workers` worker reports in)."""
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
    # SIGHUP / SIGUSR2 rescan the repository; signals arriving during a rescan coalesce into one more. Installed
    # before the address is printed, so whoever reads it may signal at once (SIGHUP would otherwise kill us).
    for signum in (signal.SIGHUP, signal.SIGUSR2):
        asyncio.get_running_loop().add_signal_handler(signum, server.repository.request_rescan)
    print("\n".join(_describe(server)), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if on_ready is not None:  # after the handlers: a signal from then on drains
        on_ready(server)
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
    if settings.workers != 1:
        from tensorgate.server.workers import run_workers  # imported here: it imports this module's _serve

        return run_workers(settings)
    return asyncio.run(_serve(settings))


if __name__ == "__main__":
    sys.exit(main())
