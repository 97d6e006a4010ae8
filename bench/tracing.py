"""Tracing cost benchmark: MLP throughput with tracing off, at 1% sampling and at 100%, in one run, interleaved.

`python -m bench.tracing --models bench/models --out bench/results` (part of `make bench`):

1. starts an OTLP/gRPC trace sink in this process (`SpanSink`: accepts and counts spans, like a collector that
   drops them), so the traced servers really encode and export their spans, as they would in production;
2. starts one `tensorgate serve` per variant over a repository holding only the MLP, each as a subprocess:
   `off` (no tracing, no metrics: the default), `metrics` (the Prometheus endpoint on, tracing off; for
   reference), `1%` and `100%` (`--tracing --trace-sample-ratio R`, exporting OTLP/gRPC to the sink);
3. checks each server once with a real call, then for `--rounds` rounds, per concurrency, runs h2load against
   every variant in turn, rotating the order each round so no variant always goes first;
4. reports each variant's median requests/s and latency, and its cost against `off`: one minus the median of the
   per-round ratios (runs of a round are adjacent in time); writes `tracing.md` and `tracing.json`.

h2load sends no `traceparent`, so every call starts a trace and the server's own ratio decides. The target (cost
at 1% sampling <= 3%) is evaluated and reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench import h2load
from bench.serving import (
    METHOD,
    Measurement,
    ModelCase,
    ServerProcess,
    _fmt,
    _json_safe,
    _rate,
    _tensorgate_command,
    machine_info,
    paired_ratio,
    prepare_model,
    probe,
    summarize,
)

__all__ = ["VARIANTS", "SpanSink", "Variant", "main", "run_benchmark"]

MODEL = "mlp"
#: Cost at 1% sampling, as a fraction of the untraced throughput, that the project aims to stay under.
TARGET_COST_AT_1PCT = 0.03
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Variant:
    """One server configuration: its name in the report and its extra `tensorgate serve` flags."""

    name: str
    flags: tuple[str, ...]
    traced: bool = False


VARIANTS = (
    Variant("off", ()),
    Variant("metrics", ("--metrics-address", "127.0.0.1:0")),
    Variant("1%", ("--tracing", "--trace-sample-ratio", "0.01"), traced=True),
    Variant("100%", ("--tracing", "--trace-sample-ratio", "1.0"), traced=True),
)


class SpanSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that counts the spans it is sent and keeps none."""

    def __init__(self) -> None:
        self.spans = 0
        #: Spans by the sending process's `service.name`.
        self.by_service: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.address = ""

    def Export(  # noqa: N802 (the OTLP method's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                )
                count = sum(len(scope.spans) for scope in resource.scope_spans)
                self.spans += count
                self.by_service[service] = self.by_service.get(service, 0) + count
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self) -> str:
        """Listen on a free loopback port; return HOST:PORT."""
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.stop(grace=1).wait()
            self._server = None


def _service(variant: Variant) -> str:
    return f"tensorgate-bench-{variant.name}"


def _mlp_only(models: Path, workdir: Path) -> Path:
    """A repository with just the MLP (the servers need not load ResNet-18)."""
    repository = workdir / "models"
    repository.mkdir()
    shutil.copytree(models / MODEL, repository / MODEL)
    return repository


def _order(variants: Sequence[Variant], rnd: int) -> list[Variant]:
    """Round r runs the variants rotated by r - 1: each variant goes first once every len(variants) rounds."""
    shift = (rnd - 1) % len(variants)
    return [*variants[shift:], *variants[:shift]]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass(frozen=True, slots=True)
class Run:
    """One measured h2load run against one variant, and the server's CPU time per request during it."""

    measurement: Measurement
    cpu_us_per_request: float


def _measure(
    variant: str,
    server: ServerProcess,
    case: ModelCase,
    concurrency: int,
    rnd: int,
    rates: dict[tuple[str, int], float],
) -> Run:
    """Warm up, then one measured, count-based h2load run (both checked for gRPC success), sized from `rates`."""
    url = f"http://{server.address}{METHOD}"
    clients, streams = h2load.split_concurrency(concurrency)
    rate = rates.get((variant, concurrency))
    warm = h2load.run(
        url, case.body, requests=max(2 * concurrency, 50, int((rate or 0) * 0.5)), clients=clients, streams=streams
    )
    h2load.check_responses(warm.result, case.frame_bytes[variant], what=f"{variant} warm-up")
    rate = rate or warm.result.requests_per_s
    requests = max(4 * concurrency, 100, math.ceil(rate * case.seconds))
    process = server._process
    assert process is not None
    cpu = _cpu_seconds(process.pid)
    measured = h2load.run(
        url, case.body, requests=requests, clients=clients, streams=streams, timeout_s=max(120.0, 20 * requests / rate)
    )
    cpu = _cpu_seconds(process.pid) - cpu
    what = f"{variant} concurrency {concurrency} round {rnd}"
    result = measured.result
    h2load.check_responses(result, case.frame_bytes[variant], what=what)
    rates[(variant, concurrency)] = result.requests_per_s
    measurement = Measurement.from_h2load(
        result, measured.latencies_ms, rnd=rnd, variant=variant, model=case.name, concurrency=concurrency
    )
    return Run(measurement, 1e6 * cpu / max(result.succeeded, 1))


def _paired(values: dict[tuple[str, int, int], float], variant: str, concurrency: int) -> list[float]:
    """Per round: the variant's value over `off`'s (runs of one round are adjacent in time)."""
    return [
        value / values[("off", concurrency, rnd)]
        for (name, c, rnd), value in sorted(values.items(), key=lambda item: item[0][2])
        if name == variant and c == concurrency and values.get(("off", concurrency, rnd))
    ]


def run_benchmark(
    models: Path,
    out: Path,
    *,
    concurrencies: Sequence[int] = (1, 16),
    rounds: int = 5,
    seconds: float = 2.0,
    variants: Sequence[Variant] = VARIANTS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every round and return the report (also written to `out`).

    Each round starts a fresh server per variant (two identical server processes can differ by up to 25% here, so
    a variant must not keep one lucky or unlucky process for the whole run) and stops them at its end.
    """
    info = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    log("hot path: telemetry's own CPU per call, in process ...")
    hot_path = measure_hot_path()
    log("  " + ", ".join(f"{name} {us:.2f} us" for name, us in hot_path["us_per_call"].items()))
    sink = SpanSink()
    sink_address = sink.start()
    runs: list[Run] = []
    rates: dict[tuple[str, int], float] = {}
    banners: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        workdir = Path(tmp)
        repository = _mlp_only(models, workdir)
        case = prepare_model(repository, MODEL, seconds, workdir)
        try:
            for rnd in range(1, rounds + 1):
                order = _order(variants, rnd)
                servers: dict[str, ServerProcess] = {}
                try:
                    for variant in order:
                        servers[variant.name] = server = _start(variant, repository, workdir, sink_address, rnd)
                        case.frame_bytes[variant.name] = probe(server.address, case, variant.name)
                        banners.setdefault(variant.name, [" ".join(server.command), *server.banner])
                    for concurrency in concurrencies:
                        for variant in order:
                            before = sink.spans
                            run = _measure(variant.name, servers[variant.name], case, concurrency, rnd, rates)
                            runs.append(run)
                            m = run.measurement
                            log(
                                f"round {rnd} c={concurrency:<3d} {variant.name:8s} {m.requests_per_s:9.1f} req/s  "
                                f"{run.cpu_us_per_request:7.1f} us CPU/req  p50 {m.p50_ms:7.3f}  p99 {m.p99_ms:7.3f} ms"
                                f"  (sink: +{sink.spans - before} spans)"
                            )
                except BaseException:
                    for server in servers.values():
                        print(f"--- last lines of the {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
                    raise
                finally:
                    for server in servers.values():
                        server.stop()  # SIGTERM: traced servers flush their last spans to the sink first
        finally:
            sink.stop()
    info["loadavg_end"] = [round(load, 2) for load in os.getloadavg()]
    info["servers"] = banners
    measurements = [run.measurement for run in runs]
    summary = summarize(measurements)
    cpu = {(r.measurement.variant, r.measurement.concurrency, r.measurement.round): r.cpu_us_per_request for r in runs}
    for row in summary:
        row["cpu_us_per_request"] = statistics.median(
            value for (name, c, _), value in cpu.items() if name == row["variant"] and c == row["concurrency"]
        )
    costs: dict[str, dict[str, Any]] = {}
    for concurrency in concurrencies:
        for variant in variants:
            if variant.name == "off":
                continue
            median, per_round = paired_ratio(measurements, MODEL, concurrency, variant.name, "off")
            cpu_ratios = _paired(cpu, variant.name, concurrency)
            cpu_median = statistics.median(cpu_ratios) if cpu_ratios else float("nan")
            costs[f"{variant.name}/{concurrency}"] = {
                "variant": variant.name,
                "concurrency": concurrency,
                "throughput_ratio_median": median,
                "cost": 1.0 - median,
                "throughput_ratios_by_round": per_round,
                "cpu_ratio_median": cpu_median,
                "cpu_cost": cpu_median - 1.0,
                "cpu_ratios_by_round": cpu_ratios,
            }
    targets = []
    for concurrency in concurrencies:
        cost = costs.get(f"1%/{concurrency}")
        if cost is None:
            continue
        targets.append(
            {
                "target": f"tracing at 1% sampling, concurrency {concurrency}: throughput cost "
                f"<= {TARGET_COST_AT_1PCT:.0%}",
                "measured": cost["cost"],
                "met": cost["cost"] <= TARGET_COST_AT_1PCT,
            }
        )
        targets.append(
            {
                "target": f"tracing at 1% sampling, concurrency {concurrency}: server CPU per request "
                f"<= +{TARGET_COST_AT_1PCT:.0%}",
                "measured": cost["cpu_cost"],
                "met": cost["cpu_cost"] <= TARGET_COST_AT_1PCT,
            }
        )
    for concurrency in concurrencies:
        baseline = next(
            (
                row["cpu_us_per_request"]
                for row in summary
                if row["variant"] == "off" and row["concurrency"] == concurrency
            ),
            None,
        )
        if baseline:
            added = hot_path["added_us_per_call"]["1%"]
            targets.append(
                {
                    "target": f"tracing at 1% sampling, concurrency {concurrency}: hot-path CPU added per call "
                    f"<= {TARGET_COST_AT_1PCT:.0%} of a request's server CPU",
                    "measured": added / baseline,
                    "met": added / baseline <= TARGET_COST_AT_1PCT,
                }
            )
    exported = {variant.name: sink.by_service.get(_service(variant), 0) for variant in variants}
    requests_sent: dict[str, int] = {}
    for m in measurements:
        requests_sent[m.variant] = requests_sent.get(m.variant, 0) + m.requests
    report: dict[str, Any] = {
        "config": {
            "model": MODEL,
            "concurrencies": list(concurrencies),
            "rounds": rounds,
            "seconds": seconds,
            "variants": {variant.name: list(variant.flags) for variant in variants},
            "concurrency_mapping": "h2load -c 1 -m concurrency, count-based (-n)",
        },
        "machine": info,
        "targets": targets,
        "summary": summary,
        "costs": costs,
        "hot_path": hot_path,
        "spans_exported": exported,
        "requests_sent": requests_sent,
        "runs": [{**run.measurement.to_dict(), "cpu_us_per_request": run.cpu_us_per_request} for run in runs],
    }
    (out / "tracing.json").write_text(json.dumps(_json_safe(report), indent=2) + "\n")
    (out / "tracing.md").write_text(render_markdown(report))
    return report


def _start(variant: Variant, repository: Path, workdir: Path, sink: str, rnd: int) -> ServerProcess:
    env = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{sink}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": _service(variant),
    }
    command = [*_tensorgate_command(repository), *variant.flags]
    server = ServerProcess(f"tensorgate[{variant.name}]", command, workdir / f"{variant.name}-{rnd}.log", env)
    server.start(300.0)
    return server


# --------------------------------------------------------------------------------------------- hot path


class _Context:
    """The parts of a grpc.aio ServicerContext the telemetry interceptor reads, as h2load's calls present them."""

    _metadata = (("user-agent", "h2load nghttp2/1.52.0"), ("te", "trailers"))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None


class _Version:
    name = "mlp"
    version = 1


class _Service:
    """Stands in for InferenceService: `route` and `run` do nothing, so what is timed is telemetry's own work."""

    def __init__(self, run_batch: Callable[[int, dict[str, Any]], Any]) -> None:
        self._run_batch = run_batch

    def route(self, request: Any) -> Any:
        return _Version()

    async def run(self, target: Any, request: Any, *, tag: object = None) -> Any:
        await self._run_batch(0, {})
        return None


async def _noop_batch(instance: int, inputs: dict[str, Any]) -> dict[str, Any]:
    return {}


def hot_path_us(settings: dict[str, Any], calls: int = 20000) -> float:
    """CPU µs per unary call that telemetry adds with `settings`: the real interceptor, request probe and batch
    wrapper around a handler, a core and an engine that do nothing (spans go nowhere: export is not included).
    """
    import asyncio
    import time

    from tensorgate.server.inference import InferenceRequest
    from tensorgate.server.settings import ServerSettings
    from tensorgate.server.statistics import VersionStatistics
    from tensorgate.server.telemetry import Telemetry

    telemetry = Telemetry(ServerSettings(**settings), environ={"OTEL_TRACES_EXPORTER": "none"})
    run_batch: Callable[[int, dict[str, Any]], Any] = _noop_batch
    if telemetry.instrumentation is not None:

        class _Engine:
            instance_count = 1
            description = "none"

        engine: Any = _Engine()
        run_batch, _ = telemetry.instrumentation.instrument("mlp", 1, engine, _noop_batch, VersionStatistics())
    service = _Service(run_batch)
    probe = telemetry.probe

    async def behavior(request: Any, context: Any) -> Any:
        core = InferenceRequest(model="mlp", inputs={}, request_id="bench")
        if probe is not None:
            return await probe.infer(service, core)  # type: ignore[arg-type]
        return await service.run(service.route(core), core)

    handler: Any = grpc.unary_unary_rpc_method_handler(behavior)
    interceptor = telemetry.interceptor(None)  # type: ignore[arg-type]

    async def main() -> float:
        call = handler.unary_unary
        if interceptor is not None:

            async def continuation(details: Any) -> Any:
                return handler

            details: Any = SimpleNamespace(
                method="/tensorgate.v1.Predict/Predict", invocation_metadata=_Context._metadata
            )
            call = (await interceptor.intercept_service(continuation, details)).unary_unary
        context = _Context()
        for _ in range(500):  # warm caches and label tables
            await call(None, context)
        started = time.process_time()
        for _ in range(calls):
            await call(None, context)
        return (time.process_time() - started) / calls * 1e6

    try:
        return asyncio.run(main())
    finally:
        telemetry.stop()


HOT_PATH_VARIANTS: dict[str, dict[str, Any]] = {
    "off": {},
    "metrics": {"metrics_address": "127.0.0.1:0"},
    "1%": {"tracing": True, "trace_sample_ratio": 0.01},
    "100%": {"tracing": True, "trace_sample_ratio": 1.0},
}


def measure_hot_path(repeats: int = 5) -> dict[str, Any]:
    """Median over `repeats` interleaved measurements of each variant's µs per call, and each one's added µs."""
    times: dict[str, list[float]] = {name: [] for name in HOT_PATH_VARIANTS}
    for _ in range(repeats):
        for name, settings in HOT_PATH_VARIANTS.items():
            times[name].append(hot_path_us(settings, calls=2000 if name == "100%" else 20000))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "us_per_call": medians,
        "added_us_per_call": {name: medians[name] - medians["off"] for name in medians if name != "off"},
        "by_repeat": times,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """tracing.md: the target first, then throughput and latency per variant, then each round."""
    cfg, info = report["config"], report["machine"]
    lines = [
        "# Tracing cost benchmark",
        "",
        f"{info['date']} · {info['nproc']} CPUs ({info['cpu_model']}) · load average at start "
        f"{info['loadavg_start'][0]}, at end {info['loadavg_end'][0]}",
        "",
        f"MLP, batch-1 `Predict` over h2load (`-c 1 -m N`), medians of {cfg['rounds']} interleaved rounds (a fresh "
        "server per variant per round, variant order rotated each round). Variants: `off` = no tracing, no metrics "
        "(the default); `metrics` = the Prometheus endpoint on; `1%` / `100%` = `--tracing --trace-sample-ratio "
        "0.01 / 1.0`, spans exported over OTLP/gRPC to a sink in the benchmark process. Throughput cost = 1 - "
        "median of the per-round requests/s ratios to `off`; CPU cost = median of the per-round ratios of the "
        "server's CPU time per request (user + system, all threads, from /proc) to `off`, minus 1: the steadier "
        "figure on a shared machine. See bench/README.md.",
        "",
        "## Target (reported, not asserted)",
        "",
        "| target | measured (cost) | met |",
        "| --- | ---: | :---: |",
    ]
    for target in report["targets"]:
        lines.append(
            f"| {target['target']} | {_fmt(100 * target['measured'], 1)}% | {'yes' if target['met'] else '**no**'} |"
        )
    table = {(row["variant"], row["concurrency"]): row for row in report["summary"]}
    for concurrency in cfg["concurrencies"]:
        lines += [
            "",
            f"## Concurrency {concurrency}",
            "",
            "| variant | req/s | throughput cost | CPU µs/request | CPU cost | p50 ms | p99 ms "
            "| throughput ratios to off by round | CPU ratios by round |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for name in cfg["variants"]:
            row = table.get((name, concurrency))
            if row is None:
                continue
            cost = report["costs"].get(f"{name}/{concurrency}")
            if cost is None:
                throughput_cost = cpu_cost = "(baseline)"
                ratios = cpu_ratios = ""
            else:
                throughput_cost = f"{_fmt(100 * cost['cost'], 1)}%"
                cpu_cost = f"{_fmt(100 * cost['cpu_cost'], 1)}%"
                ratios = ", ".join(_fmt(r) for r in cost["throughput_ratios_by_round"])
                cpu_ratios = ", ".join(_fmt(r) for r in cost["cpu_ratios_by_round"])
            lines.append(
                f"| {name} | {_rate(row['requests_per_s'])} | {throughput_cost} | {_fmt(row['cpu_us_per_request'], 1)} "
                f"| {cpu_cost} | {_fmt(row['p50_ms'])} | {_fmt(row['p99_ms'])} | {ratios} | {cpu_ratios} |"
            )
    lines += [
        "",
        "## Requests/s in each round",
        "",
        "| variant | concurrency | rounds |",
        "| --- | ---: | --- |",
    ]
    for row in sorted(report["summary"], key=lambda r: (r["concurrency"], list(cfg["variants"]).index(r["variant"]))):
        rounds = ", ".join(_rate(v) for v in row["requests_per_s_by_round"])
        lines.append(f"| {row['variant']} | {row['concurrency']} | {rounds} |")
    hot = report["hot_path"]
    off_cpu = {row["concurrency"]: row["cpu_us_per_request"] for row in report["summary"] if row["variant"] == "off"}
    lines += [
        "",
        "## Hot path (in process)",
        "",
        "CPU time per call of the real telemetry interceptor, request probe and batch wrapper around a handler, a core",
        "and an engine that do nothing (`hot_path_us`; spans go to no exporter, so export is not included): what",
        "telemetry adds to every call, measured without the network or the model, and so without their noise. Medians",
        f"of {len(next(iter(hot['by_repeat'].values())))} interleaved repeats; the share is of `off`'s server CPU per "
        "request above.",
        "",
        "| variant | µs per call | added µs | "
        + " | ".join(f"share at concurrency {c}" for c in sorted(off_cpu))
        + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in off_cpu) + " |",
    ]
    for name, us in hot["us_per_call"].items():
        added = hot["added_us_per_call"].get(name)
        shares = " | ".join("" if added is None else f"{_fmt(100 * added / off_cpu[c], 2)}%" for c in sorted(off_cpu))
        lines.append(f"| {name} | {_fmt(us, 2)} | {'' if added is None else _fmt(added, 2)} | {shares} |")
    lines += [
        "",
        "## Spans exported",
        "",
        "Received by the sink over OTLP/gRPC, against the requests each server got in measured runs (warm-ups and the",
        "probe call send more, so spans per request is an upper bound):",
        "",
        "| variant | requests (measured) | spans | spans per request |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, spans in report["spans_exported"].items():
        requests = report["requests_sent"].get(name, 0)
        per_request = _fmt(spans / requests, 2) if requests else "n/a"
        lines.append(f"| {name} | {requests:,} | {spans:,} | {per_request} |")
    lines += ["", "## Machine", ""]
    for key, value in info.items():
        if key == "servers":
            for name, banner in value.items():
                lines.append(f"- {name}:")
                lines += [f"  - `{line.strip()}`" for line in banner]
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (`python -m bench.tracing`)."""
    parser = argparse.ArgumentParser(description="tensorgate tracing cost: MLP throughput, tracing off / 1% / 100%")
    parser.add_argument("--models", type=Path, default=Path("bench/models"), help="model repository (needs mlp/)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where reports go")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--seconds", type=float, default=2.0, help="target seconds per measured run")
    args = parser.parse_args(argv)
    report = run_benchmark(
        args.models, args.out, concurrencies=tuple(args.concurrency), rounds=args.rounds, seconds=args.seconds
    )
    print()
    for target in report["targets"]:
        print(f"{'met    ' if target['met'] else 'NOT MET'}  {target['target']}: {_fmt(100 * target['measured'], 1)}%")
    print(f"wrote {args.out / 'tracing.md'} and {args.out / 'tracing.json'}")


if __name__ == "__main__":
    main()
