"""In-process ONNX Runtime baseline: what the hardware does with no server in the way.

The served numbers in `bench.serving` are divided by these. The session is what a user running ONNX Runtime
in their own process would build: `InferenceSession(path)` with ONNX Runtime's defaults (its own thread count,
spinning pool threads), not the server's tuned options, so the ratio charges the server for every choice it
makes. Calls are batch-1, like the served requests. Concurrency N is N Python threads calling `run` on
that one session, which is what N concurrent batch-1 callers of an unbatched embedding would do; ONNX Runtime
releases the GIL inside `run`, so the threads really overlap.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = [
    "InprocessResult",
    "LatencySummary",
    "load_session",
    "percentile",
    "run_inprocess",
    "sample_inputs",
    "summarize_latencies",
]

# The server's provider preference; on a CPU-only build this is just CPUExecutionProvider.
_PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_ORT_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


def load_session(model_file: Path) -> ort.InferenceSession:
    """An InferenceSession over `model_file` with ONNX Runtime's default options and the server's providers."""
    available = set(ort.get_available_providers())
    providers = [p for p in _PREFERRED_PROVIDERS if p in available]
    return ort.InferenceSession(str(model_file), providers=providers)


def sample_inputs(session: ort.InferenceSession, batch: int = 1, seed: int = 0) -> dict[str, npt.NDArray[Any]]:
    """Deterministic random inputs for every session input; variable dimensions become `batch`."""
    rng = np.random.default_rng(seed)
    feed: dict[str, npt.NDArray[Any]] = {}
    for arg in session.get_inputs():
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else batch for dim in arg.shape)
        dtype = _ORT_NUMPY.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has type {arg.type}, which the benchmark cannot generate")
        feed[arg.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, numpy's default; nan for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Latency of individual calls, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def summarize_latencies(latencies_ms: Sequence[float]) -> LatencySummary:
    """Mean, percentiles and max of a list of latencies in milliseconds."""
    return LatencySummary(
        count=len(latencies_ms),
        mean_ms=statistics.fmean(latencies_ms) if latencies_ms else float("nan"),
        p50_ms=percentile(latencies_ms, 50),
        p90_ms=percentile(latencies_ms, 90),
        p99_ms=percentile(latencies_ms, 99),
        max_ms=max(latencies_ms) if latencies_ms else float("nan"),
    )


@dataclass(frozen=True, slots=True)
class InprocessResult:
    """One timed in-process run."""

    concurrency: int
    duration_s: float
    requests: int
    requests_per_s: float
    latency: LatencySummary

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def run_inprocess(
    session: ort.InferenceSession,
    feed: Mapping[str, npt.NDArray[Any]],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.5,
) -> InprocessResult:
    """Call `session.run` from `concurrency` threads for `warmup_s` (discarded), then `duration_s` (timed).

    Requests/s counts each call by the fraction of it that lies inside the timed window, so calls in flight at
    the window's edges count in part rather than all or nothing. That matters when a call takes about as long
    as the window (ResNet-18 with 64 threads on two cores: over a second each), where whole-call counting
    swings by a full wave of completions. Latencies are those of the calls that end inside the window.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    output_names = [out.name for out in session.get_outputs()]
    inputs = dict(feed)
    start_barrier = threading.Barrier(concurrency + 1)
    per_thread: list[list[tuple[float, float]]] = [[] for _ in range(concurrency)]
    window: list[float] = [0.0, 0.0]  # measure start and end on perf_counter, set before the barrier opens

    def worker(calls: list[tuple[float, float]]) -> None:
        start_barrier.wait()
        measure_end = window[1]
        while True:
            begin = time.perf_counter()
            if begin >= measure_end:
                return
            session.run(output_names, inputs)
            calls.append((begin, time.perf_counter()))

    threads = [threading.Thread(target=worker, args=(calls,), daemon=True) for calls in per_thread]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    window[0] = now + warmup_s
    window[1] = now + warmup_s + duration_s
    start_barrier.wait()
    for thread in threads:
        thread.join()
    measure_start, measure_end = window
    calls = [call for thread_calls in per_thread for call in thread_calls]
    done = 0.0
    for begin, end in calls:
        overlap = min(end, measure_end) - max(begin, measure_start)
        if overlap > 0:
            done += overlap / max(end - begin, 1e-12)
    latencies = [(end - begin) * 1000.0 for begin, end in calls if measure_start <= end <= measure_end]
    return InprocessResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=len(latencies),
        requests_per_s=done / duration_s,
        latency=summarize_latencies(latencies),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.inprocess MODEL.onnx`: print in-process rates at a few concurrencies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("model", type=Path, help="an .onnx file")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per concurrency")
    args = parser.parse_args(argv)
    session = load_session(args.model)
    feed = sample_inputs(session)
    for concurrency in args.concurrency:
        result = run_inprocess(session, feed, concurrency=concurrency, duration_s=args.duration)
        lat = result.latency
        print(
            f"concurrency {concurrency:3d}: {result.requests_per_s:10.1f} req/s  mean {lat.mean_ms:.3f} ms  "
            f"p50 {lat.p50_ms:.3f}  p90 {lat.p90_ms:.3f}  p99 {lat.p99_ms:.3f} ms"
        )


if __name__ == "__main__":
    main()
