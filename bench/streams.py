"""Camera-stream benchmark: how many 30 fps streams the server sustains, and the latency curve as streams are added.

`python -m bench.streams --out bench/results` (part of `make bench`):

1. starts `tensorgate serve --address 127.0.0.1:0 --repository examples/models` (the bundled digits classifier, the
   small image model) as a subprocess;
2. for each payload and each stream count N (1, 2, 4, ... up the ladder), opens N camera streams from this
   process (grpc.aio, one channel, the default drop policy: latest), each sending frames at `--fps` on its own
   schedule (cameras are not synchronised: their first frames are spread over one frame interval), warms up,
   then measures for `--seconds`: end-to-end latency (frame capture to result received, both on this machine's
   clock), results/s, frames dropped by the server, per-stage server timings, and the CPU time the server and
   this load generator used;
3. stops climbing after two stream counts in a row fail the target, and writes `streams.json` and `streams.md`.

A stream count is *sustained* when p99 end-to-end latency is under `--target-ms` (100) and at least 99% of the
frames sent got a result (the rest dropped by the server). Reported, never asserted: a benchmark on a noisy
two-core machine is evidence, not a test. The load generator shares the machine (its CPU use is reported).

Payloads: `png8` (8x8 grayscale PNG digits, ~100 bytes: decoded and normalised on the server), `jpeg320`
(320x240 colour JPEG, ~10 KB, as a camera would send: decoded at reduced DCT scale, converted to gray and
resized on the server), `tensor` (the [1, 1, 8, 8] float32 tensor itself: the stream machinery alone).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from PIL import Image

from bench.serving import ServerProcess
from examples.build_digits import held_out_digits
from tensorgate.client.tensors import to_tensor
from tensorgate.v1 import stream_pb2, stream_pb2_grpc

__all__ = ["Point", "main", "measure", "payload_frames"]

REPO_ROOT = Path(__file__).resolve().parents[1]
LADDER = (1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 80, 96, 128)
PAYLOADS = ("png8", "jpeg320", "tensor")
LEVEL = 15  # digits pixels 0..16 are stored as v * 15 in the 8-bit images, and divided back by the server


# -- payloads -------------------------------------------------------------------------------------------------------


def payload_frames(payload: str, count: int = 30) -> tuple[list[stream_pb2.Frame], stream_pb2.Preprocessing | None]:
    """`count` distinct frame templates of a payload (sequence and capture time are set as they are sent)."""
    images, _ = held_out_digits()
    frames: list[stream_pb2.Frame] = []
    for index in range(count):
        digit = images[index % len(images)]
        if payload == "tensor":
            frames.append(stream_pb2.Frame(inputs=[to_tensor("image", digit[None])]))
            continue
        pixels = (digit[0] * LEVEL).round().astype(np.uint8)
        buffer = io.BytesIO()
        if payload == "png8":
            Image.fromarray(pixels).save(buffer, format="PNG")
        elif payload == "jpeg320":
            # A camera-sized colour frame showing the digit large, with some texture so JPEG has work to do.
            large = np.asarray(Image.fromarray(pixels).resize((320, 240), Image.Resampling.NEAREST))
            noise = np.random.default_rng(index).integers(0, 12, (240, 320, 3), dtype=np.uint8)
            colour = np.clip(large[..., None].astype(np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(colour).save(buffer, format="JPEG", quality=85)
        else:
            raise ValueError(f"unknown payload {payload!r} (known: {', '.join(PAYLOADS)})")
        frames.append(stream_pb2.Frame(image=stream_pb2.Image(data=buffer.getvalue())))
    # Camera frames carry 0..255 pixels; this model takes 0..16 (see LEVEL). The server resizes to 8x8 itself.
    preprocessing = (
        None if payload == "tensor" else stream_pb2.Preprocessing(std=[LEVEL], color=stream_pb2.COLOR_ORDER_GRAY)
    )
    return frames, preprocessing


# -- one measurement ------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the streams of one measurement window saw."""

    sent: int = 0
    results: int = 0
    errors: int = 0
    dropped: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stages_ns: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(4))
    first_error: str = ""


@dataclass
class Point:
    """One stream count's figures (latencies in milliseconds)."""

    payload: str
    streams: int
    offered_fps: float
    sent_fps: float
    results_fps: float
    answered: float
    dropped: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    decode_ms: float
    queue_ms: float
    infer_ms: float
    server_ms: float
    server_cpu: float
    client_cpu: float
    sustained: bool
    first_error: str = ""
    #: For a median over rounds: each round's p99.
    rounds_p99_ms: list[float] = field(default_factory=list)


def _process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _camera(
    stub: stream_pb2_grpc.StreamAsyncStub,
    config: stream_pb2.StreamConfig,
    templates: list[stream_pb2.Frame],
    fps: float,
    offset: float,
    stop_at: float,
    recording: Callable[[], Tally | None],
) -> None:
    """One camera: frames at `fps` from `offset` seconds on until `stop_at` (monotonic), results tallied."""
    interval = 1.0 / fps
    loop = asyncio.get_running_loop()

    async def requests() -> AsyncIterator[stream_pb2.StreamRequest]:
        yield stream_pb2.StreamRequest(config=config)
        due = loop.time() + offset
        sequence = 0
        while due < stop_at:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = stream_pb2.Frame()
            frame.CopyFrom(templates[sequence % len(templates)])
            frame.sequence = sequence
            frame.capture_time_ns = time.time_ns()
            tally = recording()
            if tally is not None:
                tally.sent += 1
            yield stream_pb2.StreamRequest(frame=frame)
            sequence += 1
            due += interval

    call = stub.Stream(requests())
    async for response in call:
        received = time.time_ns()
        tally = recording()
        if tally is None:
            continue
        tally.results += 1
        tally.dropped += response.dropped
        if response.HasField("error"):
            tally.errors += 1
            tally.first_error = tally.first_error or response.error.message
            continue
        tally.latencies_ms.append((received - response.capture_time_ns) / 1e6)
        timings = response.timings
        tally.stages_ns += (timings.decode_ns, timings.queue_ns, timings.infer_ns, timings.server_ns)


async def measure(
    address: str,
    payload: str,
    streams: int,
    *,
    fps: float,
    warmup: float,
    seconds: float,
    target_ms: float,
    server_pid: int,
) -> Point:
    """Run `streams` cameras for warmup + seconds; figures over the measured window."""
    templates, preprocessing = payload_frames(payload)
    config = stream_pb2.StreamConfig(model="digits", outputs=["label"])
    if preprocessing is not None:
        config.preprocessing.CopyFrom(preprocessing)
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = (start + warmup, start + warmup + seconds)
    tally = Tally()
    cpu: dict[str, float] = {}

    def recording() -> Tally | None:
        now = loop.time()
        return tally if window[0] <= now < window[1] else None

    async def sample_cpu() -> None:
        await asyncio.sleep(window[0] - loop.time())
        cpu["server"], cpu["client"] = _process_cpu_seconds(server_pid), _own_cpu_seconds()
        await asyncio.sleep(window[1] - loop.time())
        cpu["server"] = _process_cpu_seconds(server_pid) - cpu["server"]
        cpu["client"] = _own_cpu_seconds() - cpu["client"]

    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = stream_pb2_grpc.StreamStub(channel)
        cameras = [
            _camera(stub, config, templates, fps, index / (streams * fps), window[1], recording)
            for index in range(streams)
        ]
        await asyncio.gather(sample_cpu(), *cameras)

    latencies = np.asarray(tally.latencies_ms)
    ok = max(tally.results - tally.errors, 1)
    stages = tally.stages_ns / ok / 1e6
    # Of the frames the server handled in the window, the share answered (the rest it dropped).
    handled = tally.results + tally.dropped
    answered = tally.results / handled if handled else 0.0

    def pct(q: float) -> float:
        return float(np.percentile(latencies, q)) if latencies.size else math.nan

    p99 = pct(99)
    return Point(
        payload=payload,
        streams=streams,
        offered_fps=streams * fps,
        sent_fps=tally.sent / seconds,
        results_fps=tally.results / seconds,
        answered=answered,
        dropped=tally.dropped,
        errors=tally.errors,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=p99,
        max_ms=float(latencies.max()) if latencies.size else math.nan,
        decode_ms=float(stages[0]),
        queue_ms=float(stages[1]),
        infer_ms=float(stages[2]),
        server_ms=float(stages[3]),
        server_cpu=cpu.get("server", math.nan) / seconds,
        client_cpu=cpu.get("client", math.nan) / seconds,
        sustained=_sustained(p99, answered, tally.errors, target_ms),
        first_error=tally.first_error,
    )


# -- the report -----------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _curve(points: Sequence[Point], target_ms: float, width: int = 50) -> list[str]:
    """An ASCII plot of p50 (o) and p99 (x) latency per stream count, on a log scale, with the target (|)."""
    top = max([target_ms * 2, *(p.p99_ms for p in points if not math.isnan(p.p99_ms))])
    scale = math.log10(top / 1.0)

    def column(ms: float) -> int:
        return 0 if math.isnan(ms) or ms <= 1.0 else min(width - 1, round(math.log10(ms) / scale * (width - 1)))

    lines = [f"{'streams':>8}  1 ms{' ' * (width - 12)}{top:,.0f} ms"]
    target = column(target_ms)
    for point in points:
        row = [" "] * width
        row[target] = "|"
        row[column(point.p50_ms)] = "o"
        row[column(point.p99_ms)] = "x"
        lines.append(f"{point.streams:>8}  {''.join(row)}")
    lines.append(f"{'':>8}  o p50, x p99, | the {target_ms:.0f} ms target (log scale)")
    return lines


def report(points: Sequence[Point], info: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown report."""
    lines = [
        "# Camera streams benchmark",
        "",
        f"`python -m bench.streams` on {info['date']}: {info['nproc']} CPUs ({info['cpu_model']}), Python "
        f"{info['python']}, grpcio {info['grpcio']}; load average {info['loadavg_start'][0]:.2f} at start, "
        f"{info['loadavg_end'][0]:.2f} at end.",
        "",
        f"Model `digits` (the bundled 8x8 classifier, 2 ONNX Runtime instances); each stream sends {args.fps:g} "
        f"frames/s with the default drop policy (latest); {args.warmup:g} s warm-up, then {args.seconds:g} s "
        f"measured; {args.rounds} rounds, medians reported (each round's p99 in the last column). End-to-end "
        "latency is frame capture to result received, on this machine's clock. "
        f"Sustained: p99 under {args.target_ms:g} ms and at least 99% of the frames answered (the rest dropped by "
        "the server). CPU is in cores (2.0 = both); the load generator runs on the same two cores.",
        "",
    ]
    for payload in dict.fromkeys(p.payload for p in points):
        rows = [p for p in points if p.payload == payload]
        sustained = [p.streams for p in rows if p.sustained]
        best = max(sustained) if sustained else 0
        lines += [
            f"## {payload}: {best} streams sustained" + (f" ({best * args.fps:g} frames/s)" if best else ""),
            "",
            "| streams | offered fps | results fps | answered | p50 ms | p90 ms | p99 ms | max ms | decode ms "
            "| queue ms | infer ms | server ms | server CPU | client CPU | sustained | p99 per round |",
            "|" + " ---: |" * 14 + " :---: | ---: |",
        ]
        for p in rows:
            lines.append(
                f"| {p.streams} | {p.offered_fps:,.0f} | {_fmt(p.results_fps)} | {100 * p.answered:.1f}% "
                f"| {_fmt(p.p50_ms)} | {_fmt(p.p90_ms)} | {_fmt(p.p99_ms)} | {_fmt(p.max_ms)} "
                f"| {_fmt(p.decode_ms, 2)} | {_fmt(p.queue_ms, 2)} | {_fmt(p.infer_ms, 2)} | {_fmt(p.server_ms, 2)} "
                f"| {_fmt(p.server_cpu, 2)} | {_fmt(p.client_cpu, 2)} | {'yes' if p.sustained else 'no'} "
                f"| {', '.join(_fmt(ms) for ms in p.rounds_p99_ms)} |"
            )
        errors = [p.first_error for p in rows if p.first_error]
        if errors:
            lines += ["", f"Frame errors: {errors[0]}"]
        lines += ["", "```", *_curve(rows, args.target_ms), "```", ""]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg_start": [round(load, 2) for load in os.getloadavg()],
    }


def _server_command(repository: Path) -> list[str]:
    executable = Path(sys.executable).with_name("tensorgate")
    program = str(executable) if executable.exists() else shutil.which("tensorgate")
    if program is None:
        raise RuntimeError("the `tensorgate` command is not installed (make install)")
    return [program, "serve", "--address", "127.0.0.1:0", "--repository", str(repository)]


def _sustained(p99_ms: float, answered: float, errors: int, target_ms: float) -> bool:
    return bool(p99_ms < target_ms and answered >= 0.99 and errors == 0)


def median_point(runs: Sequence[Point], target_ms: float) -> Point:
    """One stream count's figures over its rounds: the median of each, sustained judged on the medians."""
    numbers = {
        name: float(np.median([getattr(run, name) for run in runs]))
        for name in (
            "sent_fps",
            "results_fps",
            "answered",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "decode_ms",
            "queue_ms",
            "infer_ms",
            "server_ms",
            "server_cpu",
            "client_cpu",
        )
    }
    errors = sum(run.errors for run in runs)
    first = runs[0]
    return Point(
        payload=first.payload,
        streams=first.streams,
        offered_fps=first.offered_fps,
        dropped=sum(run.dropped for run in runs),
        errors=errors,
        sustained=_sustained(numbers["p99_ms"], numbers["answered"], errors, target_ms),
        first_error=next((run.first_error for run in runs if run.first_error), ""),
        rounds_p99_ms=[run.p99_ms for run in runs],
        **numbers,
    )


async def _climb(address: str, pid: int, args: argparse.Namespace) -> tuple[list[Point], list[Point]]:
    """Every run, and the per-stream-count medians. Round 1 climbs the ladder until two stream counts in a row
    fail; the other rounds repeat the counts round 1 reached, so drift on this shared machine hits them alike."""
    runs: list[Point] = []
    medians: list[Point] = []

    async def run(payload: str, streams: int, round_number: int) -> Point:
        point = await measure(
            address,
            payload,
            streams,
            fps=args.fps,
            warmup=args.warmup,
            seconds=args.seconds,
            target_ms=args.target_ms,
            server_pid=pid,
        )
        runs.append(point)
        print(
            f"round {round_number} {payload:>8} {streams:>4} streams: {point.results_fps:7.1f} results/s of "
            f"{point.offered_fps:6.0f}, answered {100 * point.answered:5.1f}%, p50 {_fmt(point.p50_ms):>7} ms, "
            f"p99 {_fmt(point.p99_ms):>7} ms, server CPU {_fmt(point.server_cpu, 2)}, client CPU "
            f"{_fmt(point.client_cpu, 2)}" + ("" if point.sustained else "  (not sustained)"),
            flush=True,
        )
        return point

    for payload in args.payload:
        ladder: list[int] = []
        failures = 0
        for streams in args.streams:
            ladder.append(streams)
            failures = 0 if (await run(payload, streams, 1)).sustained else failures + 1
            if failures >= 2:
                break
        for round_number in range(2, args.rounds + 1):
            for streams in ladder:
                await run(payload, streams, round_number)
        for streams in ladder:
            mine = [point for point in runs if point.payload == payload and point.streams == streams]
            medians.append(median_point(mine, args.target_ms))
    return medians, runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="where to write the report")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "examples" / "models")
    parser.add_argument("--payload", nargs="+", choices=PAYLOADS, default=["png8", "jpeg320"])
    parser.add_argument("--streams", nargs="+", type=int, default=list(LADDER), help="stream counts to try, in order")
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second per stream")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians over them")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--target-ms", type=float, default=100.0, help="p99 end-to-end latency target")
    args = parser.parse_args(argv)

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess("tensorgate", _server_command(args.repository), Path(tmp) / "tensorgate.log")
        address = server.start(timeout_s=120)
        pid = server._process.pid if server._process is not None else 0  # its pid, for its CPU time
        try:
            points, runs = asyncio.run(_climb(address, pid, args))
        finally:
            server.stop()
    info["loadavg_end"] = [round(load, 2) for load in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streams.json").write_text(
        json.dumps(
            {
                "machine": info,
                "settings": vars(args) | {"out": str(args.out)},
                "medians": [asdict(p) for p in points],
                "runs": [asdict(p) for p in runs],
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    text = report(points, info, args)
    (args.out / "streams.md").write_text(text)
    print(f"wrote {args.out / 'streams.md'} and {args.out / 'streams.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
