"""Serving benchmark: tensorgate over gRPC vs. ONNX Runtime in-process vs. a bare grpc.aio server, in one run.

`python -m bench.serving --models bench/models --out bench/results` (what `make bench` runs):

1. starts `tensorgate serve --address 127.0.0.1:0 --repository MODELS` and, for the MLP, the bare reference
   server (`bench.reference_server`), each as a subprocess, reading the port from its `listening on HOST:PORT`
   line;
2. checks each server once with a real gRPC call: the reply must decode and match in-process ONNX Runtime's
   output, and its size becomes the expected per-response DATA size that every h2load run is checked against
   (h2load alone would count gRPC errors as successes);
3. for `--rounds` rounds, for each model and concurrency, measures in-process ONNX Runtime, then tensorgate
   under h2load, then (MLP at concurrency 1 and 16) the reference server: variants interleaved A B A B, so slow
   drift on this shared machine hits them alike; every figure reported is the median over rounds;
4. while the server is still up, runs Triton's perf_analyzer against it over the Open Inference Protocol
   (`bench/perf_analyzer.py`, concurrency 1 to 8) for its client-side figures and the server-side queue and
   compute split from ModelStatistics;
5. writes `serving.json` (every run, medians, machine) and `serving.md` (tables and the targets).

Concurrency N is one HTTP/2 connection with N concurrent streams (`h2load -c 1 -m N`), the way one gRPC channel
carries N outstanding calls; `--connections K` spreads N over K connections instead. h2load runs count-based
(`-n`), sized from the previous rate to last about `--seconds` (model-specific defaults), after a short
discarded warm-up run on a fresh connection.

Targets are evaluated and reported, never asserted: a benchmark on a noisy two-core machine is evidence, not a
test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bench import h2load
from bench import perf_analyzer as perf
from bench.inprocess import load_session, run_inprocess, sample_inputs, summarize_latencies
from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import predict_pb2

__all__ = ["BenchConfig", "ModelCase", "ServerProcess", "main", "run_benchmark"]

METHOD = "/tensorgate.v1.Predict/Predict"
_LISTENING = re.compile(r"listening on (\S+):(\d+)\s*$")
_REPO_ROOT = Path(__file__).resolve().parents[1]

#: Per model: seconds per measured run (ResNet-18 runs at ~50 requests/s here, so few requests).
DEFAULT_SECONDS = {"resnet18": 4.0, "mlp": 2.0}
#: Concurrencies at which the MLP is also served by the bare reference server.
REFERENCE_CONCURRENCIES = (1, 16)
#: perf_analyzer requests per measurement window, per model (ResNet-18 serves ~50 requests/s here).
PERF_ANALYZER_REQUESTS = {"resnet18": 100, "mlp": 500}


# --------------------------------------------------------------------------------------------- servers


class ServerProcess:
    """A server subprocess that announces `... listening on HOST:PORT` on stdout once it is ready.

    Its stdout and stderr go to `log_path` (a thread keeps draining stdout so a chatty server never blocks on a
    full pipe; a blocked server would look slow, not broken). `stop` sends SIGTERM, the documented way to stop
    both servers, and kills after a grace period.
    """

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self._env = env
        self._process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self.address = ""
        # The first stdout lines (tensorgate prints each model's engine after its ready line), for the report.
        self.banner: list[str] = []
        self._stopping = False

    def start(self, timeout_s: float) -> str:
        """Start the process and return HOST:PORT from its ready line; raise with the log tail on failure."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w", buffering=1)
        self._process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=_REPO_ROOT,
            env=self._env,
        )
        found: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._drain, args=(found,), daemon=True, name=f"{self.name}-stdout").start()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                address = found.get(timeout=0.2)
                break
            except queue.Empty:
                pass
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self._process.returncode} before it was ready:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")
        host, port = address.rsplit(":", 1)
        # A wildcard bind is printed as such; connect over loopback.
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        self.address = f"{host}:{port}"
        return self.address

    def _drain(self, found: queue.Queue[str]) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        assert self._log is not None
        announced = False
        for line in self._process.stdout:
            self._log.write(line)
            if len(self.banner) < 20 and not self._stopping:
                self.banner.append(line.rstrip())
            if not announced and (match := _LISTENING.search(line)):
                announced = True
                found.put(f"{match[1]}:{match[2]}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL."""
        process = self._process
        if process is None:
            return
        self._stopping = True
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _tensorgate_command(models: Path) -> list[str]:
    # The venv's console script sits next to the interpreter running us; fall back to PATH.
    executable = Path(sys.executable).with_name("tensorgate")
    program = str(executable) if executable.exists() else shutil.which("tensorgate")
    if program is None:
        raise RuntimeError("the `tensorgate` command is not installed (make install)")
    return [program, "serve", "--address", "127.0.0.1:0", "--repository", str(models)]


def _reference_command(model_file: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "bench.reference_server", "--model", str(model_file), "--mode", mode]


# --------------------------------------------------------------------------------------------- models


@dataclass
class ModelCase:
    """One benchmarked model: its file, the batch-1 request every run sends, and its in-process session."""

    name: str
    model_file: Path
    seconds: float
    session: ort.InferenceSession
    feed: dict[str, npt.NDArray[Any]]
    expected: dict[str, npt.NDArray[Any]]
    request: bytes
    body: Path
    # Per server: 5 + the serialized size of a successful response (measured by `probe`).
    frame_bytes: dict[str, int] = field(default_factory=dict)


def _model_file(models: Path, name: str) -> Path:
    """`<models>/<name>/<highest numeric version>/model.onnx`, Triton's layout."""
    folder = models / name
    versions = sorted(
        (int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []
    )
    for version in reversed(versions):
        candidate = folder / str(version) / "model.onnx"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{folder}: no <version>/model.onnx (build it with: python -m bench.models)")


def prepare_model(models: Path, name: str, seconds: float, workdir: Path) -> ModelCase:
    """Load the in-process session and build the request (and h2load body file) for one model.

    The request sets `request_id` so that every response has the same size; the size check depends on it.
    """
    model_file = _model_file(models, name)
    session = load_session(model_file)
    feed = sample_inputs(session, batch=1)
    output_names = [out.name for out in session.get_outputs()]
    expected = dict(zip(output_names, session.run(output_names, feed), strict=True))
    request = predict_pb2.PredictRequest(
        model=name, inputs=[to_tensor(key, value) for key, value in feed.items()], request_id="bench"
    ).SerializeToString()
    body = h2load.write_body(workdir / f"{name}.body", request)
    return ModelCase(name, model_file, seconds, session, feed, expected, request, body)


def probe(address: str, case: ModelCase, server: str) -> int:
    """One real gRPC call with the exact bytes h2load sends; check the reply and return its frame size."""
    with grpc.insecure_channel(address) as channel:
        # No serializers: bytes in, bytes out, exactly what h2load sends and receives.
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        try:
            reply: bytes = call(case.request, timeout=120.0)
        except grpc.RpcError as exc:
            raise RuntimeError(f"{server}: Predict({case.name}) failed: {exc}") from exc
    response = predict_pb2.PredictResponse.FromString(reply)
    got = {tensor.name: from_tensor(tensor) for tensor in response.outputs}
    for name, want in case.expected.items():
        if name not in got:
            raise RuntimeError(f"{server}: {case.name} reply lacks output {name!r} (has {sorted(got)})")
        if got[name].shape != want.shape or not np.allclose(got[name], want, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"{server}: {case.name} output {name!r} differs from in-process ONNX Runtime")
    return len(h2load.grpc_frame(reply))


# --------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True, slots=True)
class Measurement:
    """One timed run of one variant ("tensorgate", "reference" or "inprocess")."""

    round: int
    variant: str
    model: str
    concurrency: int
    requests: int
    elapsed_s: float
    requests_per_s: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    h2load_mean_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_h2load(
        cls,
        result: h2load.H2loadResult,
        latencies_ms: list[float],
        *,
        rnd: int,
        variant: str,
        model: str,
        concurrency: int,
    ) -> Measurement:
        """One served run: h2load's counts, and percentiles from its per-request log."""
        summary = summarize_latencies(latencies_ms)
        return cls(
            round=rnd,
            variant=variant,
            model=model,
            concurrency=concurrency,
            requests=result.succeeded,
            elapsed_s=result.elapsed_s,
            requests_per_s=result.requests_per_s,
            mean_ms=summary.mean_ms,
            p50_ms=summary.p50_ms,
            p90_ms=summary.p90_ms,
            p99_ms=summary.p99_ms,
            max_ms=summary.max_ms,
            h2load_mean_ms=result.request_time.mean_us / 1000.0,
        )


@dataclass
class BenchConfig:
    """What to run; the defaults are what `make bench` runs."""

    models: Path
    out: Path
    model_names: tuple[str, ...] = ("resnet18", "mlp")
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    rounds: int = 3
    connections: int = 1
    seconds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SECONDS))
    warmup_s: float = 0.5
    reference: bool = True
    reference_mode: str = "inline"
    startup_timeout_s: float = 300.0
    #: perf_analyzer to run after the rounds (None: skip it), and its concurrency range.
    perf_analyzer: Path | None = perf.DEFAULT_BINARY
    perf_analyzer_concurrency: tuple[int, int] = (1, 8)


class Runner:
    """Runs h2load against servers, sizing each count-based run from the rate last seen."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self._rates: dict[tuple[str, str, int], float] = {}

    def _estimate(self, variant: str, model: str, concurrency: int) -> float | None:
        exact = self._rates.get((variant, model, concurrency))
        if exact is not None:
            return exact
        # Before the first run at this concurrency, any rate for the model beats none.
        rates = [rate for (v, m, _), rate in self._rates.items() if v == variant and m == model]
        return min(rates) if rates else None

    def served(self, variant: str, address: str, case: ModelCase, concurrency: int, rnd: int) -> Measurement:
        """Warm up, then one measured h2load run; both checked for gRPC success by response size."""
        clients, streams = h2load.split_concurrency(concurrency, self.config.connections)
        url = f"http://{address}{METHOD}"
        estimate = self._estimate(variant, case.name, concurrency)
        warm_requests = max(2 * concurrency, 10)
        if estimate is not None:
            warm_requests = max(concurrency, math.ceil(estimate * self.config.warmup_s))
        warm = h2load.run(url, case.body, requests=warm_requests, clients=clients, streams=streams)
        h2load.check_responses(warm.result, case.frame_bytes[variant], what=f"{variant} {case.name} warm-up")
        rate = estimate if estimate is not None else warm.result.requests_per_s
        requests = max(4 * concurrency, 20, math.ceil(rate * case.seconds))
        timeout = max(120.0, 20 * requests / max(rate, 1e-3))
        measured = h2load.run(url, case.body, requests=requests, clients=clients, streams=streams, timeout_s=timeout)
        what = f"{variant} {case.name} concurrency {concurrency} round {rnd}"
        h2load.check_responses(measured.result, case.frame_bytes[variant], what=what)
        result = measured.result
        self._rates[(variant, case.name, concurrency)] = result.requests_per_s
        latencies = measured.latencies_ms
        if len(latencies) != result.succeeded:
            raise h2load.H2loadError(
                f"{what}: h2load logged {len(latencies)} successful requests, its summary says {result.succeeded}"
            )
        return Measurement.from_h2load(
            result, latencies, rnd=rnd, variant=variant, model=case.name, concurrency=concurrency
        )

    def inprocess(self, case: ModelCase, concurrency: int, rnd: int) -> Measurement:
        """In-process ONNX Runtime on the same request, `concurrency` threads, same duration."""
        result = run_inprocess(
            case.session,
            case.feed,
            concurrency=concurrency,
            duration_s=case.seconds,
            warmup_s=self.config.warmup_s,
        )
        lat = result.latency
        return Measurement(
            round=rnd,
            variant="inprocess",
            model=case.name,
            concurrency=concurrency,
            requests=result.requests,
            elapsed_s=result.duration_s,
            requests_per_s=result.requests_per_s,
            mean_ms=lat.mean_ms,
            p50_ms=lat.p50_ms,
            p90_ms=lat.p90_ms,
            p99_ms=lat.p99_ms,
            max_ms=lat.max_ms,
        )


# --------------------------------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def summarize(measurements: Sequence[Measurement]) -> list[dict[str, Any]]:
    """Medians over rounds per (variant, model, concurrency), plus each round's requests/s."""
    groups: dict[tuple[str, str, int], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.variant, m.model, m.concurrency), []).append(m)
    rows: list[dict[str, Any]] = []
    for (variant, model, concurrency), runs in groups.items():
        row: dict[str, Any] = {"variant": variant, "model": model, "concurrency": concurrency}
        for key in ("requests_per_s", "mean_ms", "p50_ms", "p90_ms", "p99_ms"):
            row[key] = _median([getattr(run, key) for run in runs])
        row["rounds"] = len(runs)
        row["requests_per_s_by_round"] = [run.requests_per_s for run in runs]
        rows.append(row)
    return rows


def paired_ratio(
    measurements: Sequence[Measurement], model: str, concurrency: int, numerator: str, denominator: str
) -> tuple[float, list[float]]:
    """Median over rounds of numerator/denominator requests/s, each ratio from runs of the same round."""
    by_round: dict[tuple[str, int], float] = {
        (m.variant, m.round): m.requests_per_s
        for m in measurements
        if m.model == model and m.concurrency == concurrency
    }
    rounds = sorted({rnd for _, rnd in by_round})
    ratios = [
        by_round[(numerator, rnd)] / by_round[(denominator, rnd)]
        for rnd in rounds
        if (numerator, rnd) in by_round and by_round.get((denominator, rnd))
    ]
    return _median(ratios), ratios


def best_inprocess_ratio(
    measurements: Sequence[Measurement], model: str, concurrency: int
) -> tuple[float, list[float]]:
    """Like `paired_ratio` for tensorgate / in-process, but against the round's best in-process rate at any
    concurrency. Threads sharing one session contend, so the same-concurrency figure can flatter the server.
    """
    best: dict[int, float] = {}
    served: dict[int, float] = {}
    for m in measurements:
        if m.model != model:
            continue
        if m.variant == "inprocess":
            best[m.round] = max(best.get(m.round, 0.0), m.requests_per_s)
        elif m.variant == "tensorgate" and m.concurrency == concurrency:
            served[m.round] = m.requests_per_s
    ratios = [served[rnd] / best[rnd] for rnd in sorted(served) if best.get(rnd)]
    return _median(ratios), ratios


def evaluate_targets(measurements: Sequence[Measurement], summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The project's serving targets, each with the measured value and whether it was met (report only)."""
    table = {(row["variant"], row["model"], row["concurrency"]): row for row in summary}
    targets: list[dict[str, Any]] = []
    for concurrency in sorted({c for v, m, c in table if v == "tensorgate" and m == "resnet18" and c >= 4}):
        if ("inprocess", "resnet18", concurrency) not in table:
            continue
        ratio, _ = paired_ratio(measurements, "resnet18", concurrency, "tensorgate", "inprocess")
        strict, _ = best_inprocess_ratio(measurements, "resnet18", concurrency)
        targets.append(
            {
                "target": f"ResNet-18, concurrency {concurrency}: served / in-process requests/s >= 0.95",
                "measured": ratio,
                "threshold": 0.95,
                "met": ratio >= 0.95,
                # Informational: against the best in-process rate at any concurrency.
                "vs_best_inprocess": strict,
            }
        )
    mlp1 = table.get(("tensorgate", "mlp", 1))
    if mlp1 is not None:
        targets.append(
            {
                "target": "MLP, concurrency 1: mean latency <= 0.5 ms",
                "measured": mlp1["mean_ms"],
                "threshold": 0.5,
                "met": mlp1["mean_ms"] <= 0.5,
            }
        )
    if ("tensorgate", "mlp", 16) in table and ("reference", "mlp", 16) in table:
        ratio, _ = paired_ratio(measurements, "mlp", 16, "tensorgate", "reference")
        targets.append(
            {
                "target": "MLP, concurrency 16: requests/s >= the bare reference server's (ratio >= 1)",
                "measured": ratio,
                "threshold": 1.0,
                "met": ratio >= 1.0,
            }
        )
    return targets


def _read_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_REPO_ROOT, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=_REPO_ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (uncommitted changes)' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _read_cpu_model(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorgate": _version("tensorgate"),
        "git_commit": _git_commit(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "onnxruntime": f"{ort.__version__} ({', '.join(ort.get_available_providers())})",
        "numpy": np.__version__,
        "h2load": h2load.h2load_version(),
        "loadavg_start": [round(load, 2) for load in os.getloadavg()],
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _rate(value: float) -> str:
    return _fmt(value, 0 if value >= 100 else 1)


def render_markdown(report: dict[str, Any]) -> str:
    """serving.md: targets first, then per model tables, then the reference comparison and the machine."""
    cfg, info = report["config"], report["machine"]
    k = cfg["connections"]
    mapping = (
        "h2load `-c 1 -m N` (N concurrent streams on one HTTP/2 connection)"
        if k == 1
        else f"h2load `-c {k} -m N/{k}` (N concurrent streams spread over {k} HTTP/2 connections)"
    )
    summary = {(r["variant"], r["model"], r["concurrency"]): r for r in report["summary"]}
    lines = [
        "# Serving benchmark",
        "",
        f"{info['date']} · {info['nproc']} CPUs ({info['cpu_model']}) · load average at start "
        f"{info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}",
        "",
        f"Medians of {cfg['rounds']} interleaved rounds. Concurrency N = {mapping}; "
        "in-process = N threads calling one ONNX Runtime session. Batch-1 requests throughout. Latencies in ms "
        "(served: request start to end of response, per request, from h2load's log). Ratios are medians of "
        "per-round ratios (runs of the same round are adjacent in time). See bench/README.md.",
        "",
        "## Targets (reported, not asserted)",
        "",
        "| target | measured | met |",
        "| --- | ---: | :---: |",
    ]
    for t in report["targets"]:
        measured = _fmt(t["measured"])
        if "vs_best_inprocess" in t:
            measured += f" (vs best in-process: {_fmt(t['vs_best_inprocess'])})"
        lines.append(f"| {t['target']} | {measured} | {'yes' if t['met'] else '**no**'} |")
    for model in cfg["model_names"]:
        lines += [
            "",
            f"## {model}",
            "",
            "| concurrency | req/s | p50 | p90 | p99 | mean | in-process req/s | in-process p50 "
            "| served / in-process | served / best in-process |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for concurrency in cfg["concurrencies"]:
            served = summary.get(("tensorgate", model, concurrency))
            local = summary.get(("inprocess", model, concurrency))
            if served is None:
                continue
            ratio = report["ratios"].get(f"{model}/{concurrency}/tensorgate:inprocess", {}).get("median")
            strict = report["ratios"].get(f"{model}/{concurrency}/tensorgate:best_inprocess", {}).get("median")
            lines.append(
                f"| {concurrency} | {_rate(served['requests_per_s'])} | {_fmt(served['p50_ms'])} "
                f"| {_fmt(served['p90_ms'])} | {_fmt(served['p99_ms'])} | {_fmt(served['mean_ms'])} "
                f"| {_rate(local['requests_per_s']) if local else 'n/a'} "
                f"| {_fmt(local['p50_ms']) if local else 'n/a'} | {_fmt(ratio)} | {_fmt(strict)} |"
            )
    reference_rows = [key for key in summary if key[0] == "reference"]
    if reference_rows:
        lines += [
            "",
            f"## MLP: tensorgate vs. the bare reference server ({cfg['reference_mode']} mode)",
            "",
            "| concurrency | tensorgate req/s | reference req/s | tensorgate / reference | tensorgate p50 "
            "| reference p50 | tensorgate p99 | reference p99 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for _, model, concurrency in sorted(reference_rows, key=lambda k: k[2]):
            ours, ref = summary.get(("tensorgate", model, concurrency)), summary[("reference", model, concurrency)]
            ratio = report["ratios"].get(f"{model}/{concurrency}/tensorgate:reference", {}).get("median")
            if ours is None:
                continue
            lines.append(
                f"| {concurrency} | {_rate(ours['requests_per_s'])} | {_rate(ref['requests_per_s'])} "
                f"| {_fmt(ratio)} | {_fmt(ours['p50_ms'])} | {_fmt(ref['p50_ms'])} | {_fmt(ours['p99_ms'])} "
                f"| {_fmt(ref['p99_ms'])} |"
            )
    lines += _render_perf_analyzer(report.get("perf_analyzer", {}))
    lines += [
        "",
        "## Requests/s in each round",
        "",
        "| variant | model | concurrency | rounds |",
        "| --- | --- | ---: | --- |",
    ]
    for row in sorted(report["summary"], key=lambda r: (r["model"], r["concurrency"], r["variant"])):
        rounds = ", ".join(_rate(v) for v in row["requests_per_s_by_round"])
        lines.append(f"| {row['variant']} | {row['model']} | {row['concurrency']} | {rounds} |")
    lines += ["", "## Machine", ""]
    for key, value in info.items():
        if key == "servers":
            for name, banner in value.items():
                lines.append(f"- {name}:")
                lines += [f"  - `{line.strip()}`" for line in banner]
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    # NaN is not JSON; an absent figure is null.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------- perf_analyzer


def run_perf_analyzer(config: BenchConfig, address: str, log: Callable[[str], None]) -> dict[str, Any]:
    """perf_analyzer over the Open Inference Protocol against the running server, per model.

    A failure is recorded in the report, not raised: the h2load figures stand without it.
    """
    if config.perf_analyzer is None:
        return {}
    low, high = config.perf_analyzer_concurrency
    models: dict[str, Any] = {}
    for name in config.model_names:
        requests = PERF_ANALYZER_REQUESTS.get(name, 200)
        log(f"perf_analyzer {name}: concurrency {low}..{high}, {requests} requests per window")
        try:
            rows = perf.run(
                address,
                name,
                binary=config.perf_analyzer,
                concurrency=(low, high),
                requests_per_window=requests,
            )
        except perf.PerfAnalyzerError as exc:
            log(f"perf_analyzer {name} failed: {exc}")
            models[name] = {"error": str(exc)}
            continue
        models[name] = {"rows": [row.to_dict() for row in rows]}
        for row in rows:
            log(
                f"perf_analyzer {name:8s} c={row.concurrency:<2d} {row.throughput:9.1f} infer/s  "
                f"p50 {row.p50_us / 1000:8.3f} ms  server queue {row.server_queue_us:7.0f} us  "
                f"compute infer {row.server_compute_infer_us:7.0f} us"
            )
    return {
        "binary": str(config.perf_analyzer),
        "concurrency": [low, high],
        "requests_per_window": {name: PERF_ANALYZER_REQUESTS.get(name, 200) for name in config.model_names},
        "models": models,
    }


def _render_perf_analyzer(results: dict[str, Any]) -> list[str]:
    if not results.get("models"):
        return []
    low, high = results["concurrency"]
    lines = [
        "",
        "## perf_analyzer over the Open Inference Protocol (gRPC)",
        "",
        f"Triton's perf_analyzer (`-i grpc`, concurrency {low} to {high}, synchronous requests, batch 1) against "
        "the same server through `inference.GRPCInferenceService`. Count-based windows, repeated until three agree "
        "within 50%. Times in microseconds, averaged per request; the server columns come from the server's own "
        "ModelStatistics (queue: waiting in the batcher; compute input / infer / output: gathering the batch, the "
        "engine, scattering the results); network + server other is the rest of the round trip.",
    ]
    for name, entry in results["models"].items():
        lines += ["", f"### {name}", ""]
        if "error" in entry:
            lines.append(f"perf_analyzer failed: `{entry['error'].splitlines()[0]}`")
            continue
        lines += perf.render_table([perf.PerfRow(**row) for row in entry["rows"]])
    return lines


# --------------------------------------------------------------------------------------------- main


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every round and return the report (also written to `config.out`)."""
    info = machine_info()
    config.out.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    measurements: list[Measurement] = []
    perf_results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        cases = [
            prepare_model(config.models, name, config.seconds.get(name, 2.0), Path(tmp)) for name in config.model_names
        ]
        try:
            tensorgate = ServerProcess("tensorgate", _tensorgate_command(config.models), Path(tmp) / "tensorgate.log")
            servers.append(tensorgate)
            log(f"starting: {' '.join(tensorgate.command)}")
            addresses = {"tensorgate": tensorgate.start(config.startup_timeout_s)}
            mlp = next((case for case in cases if case.name == "mlp"), None)
            if config.reference and mlp is not None:
                reference = ServerProcess(
                    "reference",
                    _reference_command(mlp.model_file, config.reference_mode),
                    Path(tmp) / "reference.log",
                )
                servers.append(reference)
                addresses["reference"] = reference.start(config.startup_timeout_s)
            for case in cases:
                for variant, address in addresses.items():
                    if variant == "tensorgate" or case is mlp:
                        case.frame_bytes[variant] = probe(address, case, variant)
                        log(f"{variant} {case.name}: reply checked, {case.frame_bytes[variant]} bytes per frame")
            runner = Runner(config)
            for rnd in range(1, config.rounds + 1):
                for case in cases:
                    for concurrency in config.concurrencies:
                        runs = [runner.inprocess(case, concurrency, rnd)]
                        runs.append(runner.served("tensorgate", addresses["tensorgate"], case, concurrency, rnd))
                        if "reference" in addresses and case is mlp and concurrency in REFERENCE_CONCURRENCIES:
                            runs.append(runner.served("reference", addresses["reference"], case, concurrency, rnd))
                        for m in runs:
                            log(
                                f"round {rnd} {case.name:8s} c={concurrency:<3d} {m.variant:10s} "
                                f"{m.requests_per_s:9.1f} req/s  p50 {m.p50_ms:8.3f}  p99 {m.p99_ms:8.3f}  "
                                f"mean {m.mean_ms:8.3f} ms"
                            )
                        measurements.extend(runs)
            perf_results = run_perf_analyzer(config, addresses["tensorgate"], log)
        except BaseException:
            # The servers' logs go with the temporary folder; show their ends, which usually say why.
            for server in servers:
                print(f"--- last lines of the {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            for server in reversed(servers):
                server.stop()
    info["loadavg_end"] = [round(load, 2) for load in os.getloadavg()]
    info["servers"] = {server.name: [" ".join(server.command), *server.banner] for server in servers}
    summary = summarize(measurements)
    ratios: dict[str, dict[str, Any]] = {}
    for case in cases:
        for concurrency in config.concurrencies:
            for numerator, denominator in (("tensorgate", "inprocess"), ("tensorgate", "reference")):
                median, per_round = paired_ratio(measurements, case.name, concurrency, numerator, denominator)
                if per_round:
                    ratios[f"{case.name}/{concurrency}/{numerator}:{denominator}"] = {
                        "median": median,
                        "by_round": per_round,
                    }
            median, per_round = best_inprocess_ratio(measurements, case.name, concurrency)
            if per_round:
                ratios[f"{case.name}/{concurrency}/tensorgate:best_inprocess"] = {
                    "median": median,
                    "by_round": per_round,
                }
    report: dict[str, Any] = {
        "config": {
            "model_names": list(config.model_names),
            "concurrencies": list(config.concurrencies),
            "rounds": config.rounds,
            "connections": config.connections,
            "seconds": config.seconds,
            "warmup_s": config.warmup_s,
            "reference_mode": config.reference_mode,
            "concurrency_mapping": "h2load -c connections -m concurrency/connections, count-based (-n)",
        },
        "machine": info,
        "targets": evaluate_targets(measurements, summary),
        "summary": summary,
        "ratios": ratios,
        "runs": [m.to_dict() for m in measurements],
        "perf_analyzer": perf_results,
    }
    (config.out / "serving.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    (config.out / "serving.md").write_text(render_markdown(report))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (`python -m bench.serving`)."""
    parser = argparse.ArgumentParser(
        description="tensorgate serving benchmark: h2load vs. in-process ONNX Runtime vs. a bare server"
    )
    parser.add_argument("--models", type=Path, default=Path("bench/models"), help="model repository")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where reports go")
    parser.add_argument("--model", dest="model_names", nargs="+", default=["resnet18", "mlp"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=1, help="HTTP/2 connections per h2load run")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"target seconds per measured run, all models (default: {DEFAULT_SECONDS})",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the bare reference server")
    parser.add_argument("--reference-mode", choices=("inline", "executor"), default="inline")
    parser.add_argument(
        "--perf-analyzer",
        type=Path,
        default=perf.DEFAULT_BINARY,
        help="perf_analyzer to run after the rounds (default: ../shared/tools/perf_analyzer)",
    )
    parser.add_argument("--no-perf-analyzer", action="store_true", help="skip perf_analyzer")
    args = parser.parse_args(argv)
    seconds = dict(DEFAULT_SECONDS)
    if args.seconds is not None:
        seconds = dict.fromkeys(args.model_names, args.seconds)
    config = BenchConfig(
        models=args.models,
        out=args.out,
        model_names=tuple(args.model_names),
        concurrencies=tuple(args.concurrency),
        rounds=args.rounds,
        connections=args.connections,
        seconds=seconds,
        reference=not args.no_reference,
        reference_mode=args.reference_mode,
        perf_analyzer=None if args.no_perf_analyzer else args.perf_analyzer,
    )
    report = run_benchmark(config)
    print()
    for target in report["targets"]:
        print(f"{'met    ' if target['met'] else 'NOT MET'}  {target['target']}: {_fmt(target['measured'])}")
    print(f"wrote {config.out / 'serving.md'} and {config.out / 'serving.json'}")


if __name__ == "__main__":
    main()
