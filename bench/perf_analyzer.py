"""Triton's perf_analyzer against tensorgate over the Open Inference Protocol (gRPC), and what it reports.

perf_analyzer is the load generator Triton users already run: here `perf_analyzer -i grpc` talks to
tensorgate's `inference.GRPCInferenceService` unchanged. In its default (Triton) mode it reads ModelMetadata and
ModelConfig to build requests, drives ModelInfer at each concurrency (synchronous calls, one connection per
concurrent request), and reads ModelStatistics before and after each measurement: the server-side queue and
compute times it reports are tensorgate's own per-version statistics (see server/.../statistics.py), averaged
per request.

Measurements are count-based windows (`--measurement-mode count_windows`): a window is a number of requests,
so a slow model gets fewer seconds of noise than a fixed time window would need; perf_analyzer repeats windows
(at most `--max-trials`) until three in a row agree within `--stability-percentage`: 50% by default, since this
two-core machine is shared and tighter settings often never settle. Its CSV (`-f`, `--verbose-csv`) is parsed here;
every figure in it is in microseconds except throughput (inferences/s).

    python -m bench.perf_analyzer --address 127.0.0.1:8001 --model mlp      # prints the table
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BINARY",
    "PerfAnalyzerError",
    "PerfRow",
    "build_command",
    "parse_csv",
    "render_table",
    "run",
]

#: ../shared/tools/perf_analyzer from the repository root: a wrapper that installs perf_analyzer on first use.
DEFAULT_BINARY = Path(__file__).resolve().parents[2] / "shared" / "tools" / "perf_analyzer"

# CSV column -> PerfRow field.
_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "throughput",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",
}


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed, or wrote something this parser does not understand."""


@dataclass(frozen=True, slots=True)
class PerfRow:
    """One concurrency level as perf_analyzer measured it (times in microseconds, averaged per request)."""

    concurrency: int
    throughput: float
    p50_us: float
    p90_us: float
    p99_us: float
    avg_us: float
    client_send_us: float
    network_server_us: float
    client_recv_us: float
    #: From the server's ModelStatistics: time in the batcher's queue, gathering inputs, in the engine,
    #: and scattering outputs.
    server_queue_us: float
    server_compute_input_us: float
    server_compute_infer_us: float
    server_compute_output_us: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def build_command(
    binary: Path,
    address: str,
    model: str,
    csv_path: Path,
    *,
    concurrency: tuple[int, int] = (1, 8),
    requests_per_window: int = 500,
    stability_percentage: int = 50,
    max_trials: int = 20,
) -> list[str]:
    """The perf_analyzer command line for one model at concurrency `concurrency[0]..concurrency[1]`."""
    low, high = concurrency
    return [
        str(binary),
        "-m",
        model,
        "-u",
        address,
        "-i",
        "grpc",
        "--concurrency-range",
        f"{low}:{high}:1",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(requests_per_window),
        "--stability-percentage",
        str(stability_percentage),
        "--max-trials",
        str(max_trials),
        "-f",
        str(csv_path),
        "--verbose-csv",
    ]


def parse_csv(text: str) -> list[PerfRow]:
    """perf_analyzer's `-f --verbose-csv` file, by concurrency (perf_analyzer sorts it by throughput)."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [column for column in _COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise PerfAnalyzerError(f"perf_analyzer's CSV lacks the columns {missing} (has {reader.fieldnames})")
    rows = []
    for record in reader:
        try:
            values: dict[str, Any] = {field: float(record[column]) for column, field in _COLUMNS.items()}
        except (TypeError, ValueError) as exc:
            raise PerfAnalyzerError(f"perf_analyzer's CSV row {record} is not numeric: {exc}") from None
        values["concurrency"] = int(values["concurrency"])
        rows.append(PerfRow(**values))
    if not rows:
        raise PerfAnalyzerError("perf_analyzer's CSV has no measurements")
    return sorted(rows, key=lambda row: row.concurrency)


def run(
    address: str,
    model: str,
    *,
    binary: Path = DEFAULT_BINARY,
    concurrency: tuple[int, int] = (1, 8),
    requests_per_window: int = 500,
    stability_percentage: int = 50,
    timeout_s: float = 900.0,
) -> list[PerfRow]:
    """Run perf_analyzer against `address` for `model`; PerfAnalyzerError with its output's tail on failure."""
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        csv_path = Path(tmp) / "perf.csv"
        command = build_command(
            binary,
            address,
            model,
            csv_path,
            concurrency=concurrency,
            requests_per_window=requests_per_window,
            stability_percentage=stability_percentage,
        )
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PerfAnalyzerError(f"{' '.join(command)}: {exc}") from None
        if completed.returncode != 0 or not csv_path.is_file():
            tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
            raise PerfAnalyzerError(f"{' '.join(command)} exited {completed.returncode}:\n{tail}")
        return parse_csv(csv_path.read_text())


def _us(value: float) -> str:
    return f"{value:,.0f}"


def render_table(rows: Sequence[PerfRow]) -> list[str]:
    """A markdown table: client-side rate and latency, and the server-side split from ModelStatistics."""
    lines = [
        "| concurrency | infer/s | p50 | p90 | p99 | avg | server queue | server compute input "
        "| server compute infer | server compute output | network + server other |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row.concurrency} | {row.throughput:,.1f} | {_us(row.p50_us)} | {_us(row.p90_us)} | {_us(row.p99_us)} "
            f"| {_us(row.avg_us)} | {_us(row.server_queue_us)} | {_us(row.server_compute_input_us)} "
            f"| {_us(row.server_compute_infer_us)} | {_us(row.server_compute_output_us)} "
            f"| {_us(row.network_server_us)} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (`python -m bench.perf_analyzer`)."""
    parser = argparse.ArgumentParser(description="perf_analyzer (gRPC) against a running tensorgate server")
    parser.add_argument("--address", required=True, help="HOST:PORT of the server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--binary", type=Path, default=DEFAULT_BINARY)
    parser.add_argument("--concurrency", type=int, nargs=2, default=[1, 8], metavar=("LOW", "HIGH"))
    parser.add_argument("--requests", type=int, default=500, help="requests per measurement window")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(
        args.address,
        args.model,
        binary=args.binary,
        concurrency=(args.concurrency[0], args.concurrency[1]),
        requests_per_window=args.requests,
    )
    print("\n".join(render_table(rows)))
    if args.json is not None:
        args.json.write_text(json.dumps([row.to_dict() for row in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
