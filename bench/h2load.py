"""Drive unary gRPC calls with h2load (nghttp2's compiled HTTP/2 load generator) and read what it reports.

Why h2load: a Python load generator eats the same two cores the Python server needs; h2load is C and stays
out of the way. It knows nothing about gRPC, so:

- the request body is a prebuilt gRPC message frame (`grpc_frame`: a 0 flag byte, a 4-byte big-endian length,
  the serialized request) posted with `content-type: application/grpc` and `te: trailers`;
- h2load counts an HTTP 200 as a success, and a gRPC error is an HTTP 200 too (its status travels in the
  trailers, with no DATA). `check_responses` therefore compares h2load's DATA byte count with
  `succeeded x` the exact size of a good response frame, which a caller measures once with a real gRPC call.

Count-based runs (`-n`) only: in duration-based runs (`-D` with `--warm-up-time`) h2load counts the warm-up's
responses in its traffic totals but not in its request counts, so bytes per response cannot be checked.

Latency percentiles come from `--log-file` (one row per request: start time in microseconds since the epoch,
HTTP status, microseconds to the end of the response); h2load's summary gives only min/max/mean/sd.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "GRPC_HEADERS",
    "H2loadError",
    "H2loadResult",
    "H2loadRun",
    "LogRecord",
    "ResponseCheckError",
    "TimingStats",
    "build_command",
    "check_responses",
    "grpc_frame",
    "h2load_version",
    "parse_duration",
    "parse_log",
    "parse_output",
    "run",
    "split_concurrency",
    "write_body",
]

#: Headers that make h2load's POST a gRPC call.
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")

_FRAME_HEADER = struct.Struct(">BI")


class H2loadError(RuntimeError):
    """h2load could not be run, or its output was not what this parser understands."""


class ResponseCheckError(RuntimeError):
    """h2load's counts show failed streams, non-200 statuses, or responses that are not successful gRPC replies."""


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message: flag byte 0, big-endian uint32 length, the bytes."""
    return _FRAME_HEADER.pack(0, len(message)) + message


def write_body(path: Path, message: bytes) -> Path:
    """Write `message` as a gRPC frame to `path` (h2load's `-d` body file) and return `path`."""
    path.write_bytes(grpc_frame(message))
    return path


def split_concurrency(concurrency: int, connections: int = 1) -> tuple[int, int]:
    """Map a concurrency (requests in flight) to h2load's (`-c` clients, `-m` streams per client).

    With the default of one connection, concurrency N is one HTTP/2 connection carrying N concurrent streams:
    what one gRPC channel does with N outstanding calls. More connections spread N evenly, so `connections`
    must divide N (or exceed it, in which case every connection carries one stream).
    """
    if concurrency < 1 or connections < 1:
        raise ValueError(f"concurrency and connections must be positive, got {concurrency}, {connections}")
    clients = min(connections, concurrency)
    if concurrency % clients:
        raise ValueError(f"{connections} connections do not divide concurrency {concurrency} evenly")
    return clients, concurrency // clients


_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)\s*$")


def parse_duration(text: str) -> float:
    """An h2load duration such as "580us", "14.30ms" or "3.00s", in seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise H2loadError(f"not an h2load duration: {text!r}")
    return float(match[1]) * _DURATION_UNITS[match[2]]


@dataclass(frozen=True, slots=True)
class TimingStats:
    """One of h2load's "time for ..." rows, in microseconds (`within_sd_pct`: share within mean +/- sd)."""

    min_us: float
    max_us: float
    mean_us: float
    sd_us: float
    within_sd_pct: float


@dataclass(frozen=True, slots=True)
class H2loadResult:
    """h2load's summary of one run. Byte counts are the exact figures h2load prints in parentheses."""

    elapsed_s: float
    requests_per_s: float
    requests_total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    traffic_bytes: int
    header_bytes: int
    data_bytes: int
    request_time: TimingStats
    connect_time: TimingStats
    first_byte_time: TimingStats

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


_FINISHED = re.compile(r"^finished in (\S+), ([0-9.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout",
    re.MULTILINE,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_TRAFFIC = re.compile(r"^traffic: \S+ \((\d+)\) total, \S+ \((\d+)\) headers .*?, \S+ \((\d+)\) data", re.MULTILINE)
_TIMING_ROW = r"^{label}:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+([0-9.]+)%"


def _timing(text: str, label: str) -> TimingStats:
    match = re.search(_TIMING_ROW.format(label=re.escape(label)), text, re.MULTILINE)
    if match is None:
        raise H2loadError(f"h2load output has no {label!r} row")
    lo, hi, mean, sd = (parse_duration(match[i]) * 1e6 for i in range(1, 5))
    return TimingStats(min_us=lo, max_us=hi, mean_us=mean, sd_us=sd, within_sd_pct=float(match[5]))


def _need(pattern: re.Pattern[str], text: str, what: str) -> re.Match[str]:
    match = pattern.search(text)
    if match is None:
        raise H2loadError(f"h2load output has no {what} line:\n{text}")
    return match


def parse_output(text: str) -> H2loadResult:
    """Parse h2load's summary (its stdout). Raises H2loadError when a line this needs is missing."""
    finished = _need(_FINISHED, text, "'finished in'")
    requests = _need(_REQUESTS, text, "'requests:'")
    status = _need(_STATUS, text, "'status codes:'")
    traffic = _need(_TRAFFIC, text, "'traffic:'")
    return H2loadResult(
        elapsed_s=parse_duration(finished[1]),
        requests_per_s=float(finished[2]),
        requests_total=int(requests[1]),
        started=int(requests[2]),
        done=int(requests[3]),
        succeeded=int(requests[4]),
        failed=int(requests[5]),
        errored=int(requests[6]),
        timeout=int(requests[7]),
        status_2xx=int(status[1]),
        status_3xx=int(status[2]),
        status_4xx=int(status[3]),
        status_5xx=int(status[4]),
        traffic_bytes=int(traffic[1]),
        header_bytes=int(traffic[2]),
        data_bytes=int(traffic[3]),
        request_time=_timing(text, "time for request"),
        connect_time=_timing(text, "time for connect"),
        first_byte_time=_timing(text, "time to 1st byte"),
    )


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One row of h2load's `--log-file`. `status` is -1 for a failed stream."""

    start_us: int
    status: int
    duration_us: int


def parse_log(text: str) -> list[LogRecord]:
    """Parse `--log-file` rows (tab-separated; columns beyond the first three are ignored)."""
    records: list[LogRecord] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise H2loadError(f"h2load log line {number} has {len(fields)} columns, expected 3: {line!r}")
        try:
            records.append(LogRecord(int(fields[0]), int(fields[1]), int(fields[2])))
        except ValueError:
            raise H2loadError(f"h2load log line {number} is not three integers: {line!r}") from None
    return records


def check_responses(result: H2loadResult, expected_frame_bytes: int, *, what: str = "h2load run") -> None:
    """Fail unless every request completed with HTTP 200 and a DATA payload of exactly one good response.

    `expected_frame_bytes` is 5 + the serialized size of a successful response to the same request. A gRPC
    error is HTTP 200 with no DATA, so any error makes `data_bytes` fall short of `succeeded x` that size.
    """
    problems: list[str] = []
    if result.succeeded != result.requests_total:
        problems.append(
            f"{result.succeeded} of {result.requests_total} requests succeeded "
            f"({result.failed} failed, {result.errored} errored, {result.timeout} timed out)"
        )
    if result.status_2xx != result.succeeded:
        problems.append(
            f"HTTP statuses: {result.status_2xx} 2xx, {result.status_3xx} 3xx, {result.status_4xx} 4xx, "
            f"{result.status_5xx} 5xx"
        )
    expected_data = result.succeeded * expected_frame_bytes
    if result.data_bytes != expected_data:
        per_response = result.data_bytes / result.succeeded if result.succeeded else 0.0
        problems.append(
            f"response DATA was {result.data_bytes} bytes ({per_response:.1f} per response), expected "
            f"{expected_data} ({expected_frame_bytes} per successful gRPC response): some calls returned "
            "gRPC errors (HTTP 200 with no message) or a different response"
        )
    if problems:
        raise ResponseCheckError(f"{what}: " + "; ".join(problems))


def h2load_version(executable: str = "h2load") -> str:
    """h2load's version line, e.g. "h2load nghttp2/1.52.0"."""
    path = shutil.which(executable)
    if path is None:
        raise H2loadError(f"{executable} not found; install it with: apt-get install -y nghttp2-client (Debian/Ubuntu)")
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or done.stderr.strip()


def build_command(
    url: str,
    body: Path,
    *,
    requests: int,
    clients: int = 1,
    streams: int = 1,
    threads: int = 1,
    log_file: Path | None = None,
    headers: Sequence[str] = GRPC_HEADERS,
    executable: str = "h2load",
) -> list[str]:
    """The h2load command line for a count-based run of `requests` POSTs of `body` to `url`."""
    command = [
        executable,
        f"--requests={requests}",
        f"--clients={clients}",
        f"--max-concurrent-streams={streams}",
        f"--threads={threads}",
        f"--data={body}",
    ]
    command += [f"--header={header}" for header in headers]
    if log_file is not None:
        command.append(f"--log-file={log_file}")
    command.append(url)
    return command


@dataclass(frozen=True, slots=True)
class H2loadRun:
    """A finished run: the parsed summary, the per-request log, and the raw output."""

    result: H2loadResult
    records: list[LogRecord]
    output: str
    command: list[str]

    @property
    def latencies_ms(self) -> list[float]:
        """Per-request latency (request start to end of response) of the successful requests, in ms."""
        return [record.duration_us / 1000.0 for record in self.records if record.status == 200]


def run(
    url: str,
    body: Path,
    *,
    requests: int,
    clients: int = 1,
    streams: int = 1,
    threads: int = 1,
    timeout_s: float = 600.0,
    executable: str = "h2load",
) -> H2loadRun:
    """Run h2load once (count-based) and parse its summary and per-request log.

    Raises H2loadError when h2load is missing, exits non-zero, runs past `timeout_s`, or prints something
    unparseable. It does not judge the responses: call `check_responses` for that.
    """
    path = shutil.which(executable)
    if path is None:
        raise H2loadError(f"{executable} not found; install it with: apt-get install -y nghttp2-client (Debian/Ubuntu)")
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log_file = Path(tmp) / "requests.log"
        command = build_command(
            url,
            body,
            requests=requests,
            clients=clients,
            streams=streams,
            threads=threads,
            log_file=log_file,
            executable=path,
        )
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise H2loadError(f"h2load ran past {timeout_s:.0f} s: {' '.join(command)}") from exc
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise H2loadError(f"h2load exited with {done.returncode}: {' '.join(command)}\n{output}")
        records = parse_log(log_file.read_text()) if log_file.exists() else []
    return H2loadRun(result=parse_output(done.stdout), records=records, output=output, command=command)
