"""Prometheus metrics: the server's own registry, its /metrics endpoint, and what feeds it.

Only imported when metrics are on: it needs `prometheus-client` (the `observability` extra), for the registry, the
exposition and the endpoint. Each server has its own `CollectorRegistry`, so several servers in one process (tests)
never mix their figures. What is fed per request is kept in plain numbers on the event loop (`Count`,
`Distribution`) and turned into metric families when Prometheus scrapes: no lock on the request path.

- `tensorgate_requests_total` (counter; model, version, rpc, code): every call once, under its final status.
- `tensorgate_request_duration_seconds` (histogram; model, version, rpc): unary calls, arrival to response.
- `tensorgate_stage_duration_seconds` (histogram; model, version, stage): per request for decode, route, queue and
  encode; per batch for batch, infer and scatter.
- `tensorgate_batch_size` (histogram; model, version): rows per batch run.
- `tensorgate_queue_depth` (gauge; model, version): requests waiting for a batch.
- `tensorgate_inflight_requests` (gauge; model, version): requests in batches running now.
- `tensorgate_rpcs_in_flight` (gauge; rpc): calls being served.
- `tensorgate_engine_busy_seconds_total` (counter; model, version, instance): time each engine instance spent
  running batches.
- `tensorgate_model_engine_info` (gauge, always 1; model, version, platform, engine): what serves each version.
- `tensorgate_model_ready` (gauge; model, version): 1 ready, 0 not.
- `tensorgate_stream_frames_dropped_total` (counter; model): frames a stream's drop policy discarded.
- `tensorgate_breaker_state` (gauge; model, version): the version's circuit breaker, 0 closed, 1 half-open, 2 open.
- `tensorgate_gpu_memory_used_bytes`, `tensorgate_gpu_memory_total_bytes`, `tensorgate_gpu_utilization_ratio`
  (gauges; gpu, name): through NVML, only where it loads (`nvidia-ml-py` installed, a driver, a GPU).

`model` is "" for a call that never reached a known model (an unknown name is not a label value, so a client
cannot grow the series without bound); `version` is "" until a version was chosen.
Gauges of the repository and the batchers are read when Prometheus scrapes, so they cost nothing per request.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tensorgate.server.addresses import split_address
from tensorgate.server.repository import Repository

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "WORKER_GAUGES",
    "Count",
    "Distribution",
    "Metrics",
    "StageTimers",
    "nvml_collector",
]

log = logging.getLogger(__name__)

#: Seconds: 50 µs (a tiny model's route or encode) to 10 s (a deep queue under overload).
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Rows per batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: How `tensorgate serve --workers N` combines each gauge over its worker processes (counters and histograms add
#: up; gauges not listed here add up too): "sum" for what each worker holds, "max" for what every worker sees alike
#: (the same engine, the same GPU), "min" for readiness (ready only where every worker is). A new gauge belongs here.
WORKER_GAUGES: dict[str, str] = {
    "tensorgate_queue_depth": "sum",
    "tensorgate_inflight_requests": "sum",
    "tensorgate_rpcs_in_flight": "sum",
    "tensorgate_model_ready": "min",
    "tensorgate_breaker_state": "max",
    "tensorgate_model_engine_info": "max",
    "tensorgate_gpu_memory_used_bytes": "max",
    "tensorgate_gpu_memory_total_bytes": "max",
    "tensorgate_gpu_utilization_ratio": "max",
}


class Count:
    """A counter (or, with `dec`, a gauge) kept as a plain number: the event loop is its only writer."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        """Add `amount`."""
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract `amount`."""
        self.value -= amount


class Distribution:
    """A histogram kept as plain numbers: a bisect and two additions per observation, no lock.

    prometheus_client's own histograms take a lock per bucket and per sum (about 1.4 µs an observation here, and a
    request makes several); these are only written on the event loop, and read by the scrape thread as copies.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: Per bucket (not cumulative), the last one +Inf.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (le: a value equal to a bound falls in that bound's bucket)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets by `le`, and the sum, for the exposition."""
        counts = list(self.counts)  # one C-level copy: consistent even while the loop observes
        total = self.sum
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), running))
        return buckets, total


class StageTimers:
    """One model version's stage histograms and batch sizes, looked up once."""

    __slots__ = ("batch", "batch_size", "decode", "encode", "infer", "queue", "route", "scatter")

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        stage = metrics.stage_histogram
        self.decode = stage(model, version, "decode")
        self.route = stage(model, version, "route")
        self.queue = stage(model, version, "queue")
        self.batch = stage(model, version, "batch")
        self.infer = stage(model, version, "infer")
        self.scatter = stage(model, version, "scatter")
        self.encode = stage(model, version, "encode")
        self.batch_size = metrics.batch_size(model, version)


_Labels = tuple[str, ...]


class Metrics:
    """The server's metrics (see the module docstring for the list).

    Everything fed per request lives in plain dicts of `Count` and `Distribution`, written only on the event loop,
    and turned into metric families when Prometheus scrapes (`_HotPathCollector`).
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests: dict[_Labels, Count] = {}
        self.request_durations: dict[_Labels, Distribution] = {}
        self.stage_durations: dict[_Labels, Distribution] = {}
        self.batch_sizes: dict[_Labels, Distribution] = {}
        self.engine_busy_seconds: dict[_Labels, Count] = {}
        self.rpcs_in_flight: dict[_Labels, Count] = {}
        self.frames_dropped: dict[_Labels, Count] = {}
        self.breaker_states: dict[_Labels, Count] = {}
        registry.register(_HotPathCollector(self))
        self._repository: Repository | None = None
        registry.register(_RepositoryCollector(self._current_repository))
        self._gpu = nvml_collector()
        if self._gpu is not None:
            registry.register(self._gpu)
        self._stages: dict[tuple[str, str], StageTimers] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self.address = ""

    # -- hot path ------------------------------------------------------------------------------------------

    def stages(self, model: str, version: str) -> StageTimers:
        """The stage histograms of one model version."""
        timers = self._stages.get((model, version))
        if timers is None:
            timers = self._stages[(model, version)] = StageTimers(self, model, version)
        return timers

    def stage_histogram(self, model: str, version: str, stage: str) -> Distribution:
        """`tensorgate_stage_duration_seconds{model, version, stage}`."""
        return _get(self.stage_durations, (model, version, stage), LATENCY_BUCKETS)

    def batch_size(self, model: str, version: str) -> Distribution:
        """`tensorgate_batch_size{model, version}`."""
        return _get(self.batch_sizes, (model, version), BATCH_BUCKETS)

    def engine_busy(self, model: str, version: str, instance: int) -> Count:
        """`tensorgate_engine_busy_seconds_total{model, version, instance}`."""
        return _count(self.engine_busy_seconds, (model, version, str(instance)))

    def in_flight(self, rpc: str) -> Count:
        """`tensorgate_rpcs_in_flight{rpc}`."""
        return _count(self.rpcs_in_flight, (rpc,))

    def call_finished(self, model: str, version: str, rpc: str, code: str, seconds: float | None) -> None:
        """Count one finished call; `seconds` (unary calls) goes to the end-to-end histogram."""
        _count(self.requests, (model, version, rpc, code)).value += 1
        if seconds is not None:
            _get(self.request_durations, (model, version, rpc), LATENCY_BUCKETS).observe(seconds)

    def count_dropped_frames(self, model: str, count: int) -> None:
        """`count` more frames of `model` dropped by a stream's policy."""
        _count(self.frames_dropped, (model,)).value += count

    def breaker_state(self, model: str, version: str) -> Count:
        """`tensorgate_breaker_state{model, version}`: set when the breaker changes state."""
        return _count(self.breaker_states, (model, version))

    # -- lifecycle -----------------------------------------------------------------------------------------

    def watch(self, repository: Repository) -> None:
        """Report the gauges of this repository's models and batchers."""
        self._repository = repository

    def _current_repository(self) -> Repository | None:
        return self._repository

    def serve(self, address: str) -> str:
        """Serve /metrics on HOST:PORT (port 0: a free one) on a thread; return the bound HOST:PORT."""
        host, port = split_address(address, "metrics address")
        server, thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        self._http, self._http_thread = server, thread
        self.address = f"{host}:{server.server_port}"
        return self.address

    def close(self) -> None:
        """Stop the endpoint and release NVML."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None


def _count(table: dict[_Labels, Count], labels: _Labels) -> Count:
    count = table.get(labels)
    if count is None:
        count = table[labels] = Count()
    return count


def _get(table: dict[_Labels, Distribution], labels: _Labels, bounds: tuple[float, ...]) -> Distribution:
    distribution = table.get(labels)
    if distribution is None:
        distribution = table[labels] = Distribution(bounds)
    return distribution


class _HotPathCollector(Collector):
    """The per-request figures, as metric families, built when Prometheus scrapes (on the endpoint's thread).

    `list(dict.items())` copies each table in one step, so a label set the loop adds meanwhile cannot break it.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield _counters(
            "tensorgate_requests",
            "Calls by model, version, RPC and final status code (each call once).",
            ["model", "version", "rpc", "code"],
            m.requests,
        )
        yield _histograms(
            "tensorgate_request_duration_seconds",
            "Unary calls end to end: from arrival to the response built.",
            ["model", "version", "rpc"],
            m.request_durations,
        )
        yield _histograms(
            "tensorgate_stage_duration_seconds",
            "Time in each stage of the data path: per request for decode, route, queue and encode; per batch for "
            "batch, infer and scatter.",
            ["model", "version", "stage"],
            m.stage_durations,
        )
        yield _histograms(
            "tensorgate_batch_size", "Rows in each batch the engine ran.", ["model", "version"], m.batch_sizes
        )
        yield _counters(
            "tensorgate_engine_busy_seconds",
            "Seconds each engine instance spent running batches.",
            ["model", "version", "instance"],
            m.engine_busy_seconds,
        )
        in_flight = GaugeMetricFamily("tensorgate_rpcs_in_flight", "Calls being served now.", labels=["rpc"])
        for labels, count in list(m.rpcs_in_flight.items()):
            in_flight.add_metric(list(labels), count.value)
        yield in_flight
        yield _counters(
            "tensorgate_stream_frames_dropped",
            "Stream frames discarded by the stream's drop policy.",
            ["model"],
            m.frames_dropped,
        )
        breakers = GaugeMetricFamily(
            "tensorgate_breaker_state",
            "Each model version's circuit breaker: 0 closed, 1 half-open (a trial request), 2 open (out of rotation).",
            labels=["model", "version"],
        )
        for labels, count in list(m.breaker_states.items()):
            breakers.add_metric(list(labels), count.value)
        yield breakers


def _counters(name: str, documentation: str, labels: list[str], table: dict[_Labels, Count]) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in list(table.items()):
        family.add_metric(list(values), count.value)
    return family


def _histograms(name: str, documentation: str, labels: list[str], table: dict[_Labels, Distribution]) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, distribution in list(table.items()):
        buckets, total = distribution.snapshot()
        family.add_metric(list(values), buckets, total)
    return family


class _RepositoryCollector(Collector):
    """Queue depth, in-flight requests, readiness and engines, read from the repository at scrape time.

    Runs on the endpoint's thread while the event loop changes the repository: it reads plain attributes and
    copies containers before walking them, and a scrape that still races a change reports what it saw.
    """

    def __init__(self, repository: Callable[[], Repository | None]) -> None:
        self._repository = repository

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "tensorgate_queue_depth", "Requests waiting in the batcher's queue.", labels=["model", "version"]
        )
        in_flight = GaugeMetricFamily(
            "tensorgate_inflight_requests",
            "Requests in batches that an engine is running now.",
            labels=["model", "version"],
        )
        ready = GaugeMetricFamily(
            "tensorgate_model_ready",
            "Whether the model version takes requests (1) or not (0).",
            labels=["model", "version"],
        )
        engines = GaugeMetricFamily(
            "tensorgate_model_engine_info",
            "What serves each ready model version (always 1; the labels say it).",
            # platform: what serves it; configured_platform: what its config asked for (they differ on a fallback).
            labels=["model", "version", "platform", "configured_platform", "engine"],
        )
        repository = self._repository()
        if repository is not None:
            for entry in list(repository.models()):
                for number, version in list(entry.versions.items()):
                    labels = [entry.name, str(number)]
                    ready.add_metric(labels, 1.0 if version.ready else 0.0)
                    batcher = version.batcher
                    if batcher is not None and version.ready:
                        depth.add_metric(labels, batcher.queue_depth)
                        in_flight.add_metric(labels, batcher.in_flight)
                        engines.add_metric(
                            [
                                *labels,
                                version.serving_platform or version.platform,
                                version.platform,
                                version.engine_description,
                            ],
                            1.0,
                        )
        yield from (depth, in_flight, ready, engines)


class _NvmlCollector(Collector):
    """GPU memory and utilisation per device, through NVML."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self._devices: list[tuple[str, Any, str]] = []
        for index in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            self._devices.append((str(index), handle, name.decode() if isinstance(name, bytes) else str(name)))

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("tensorgate_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"])
        total = GaugeMetricFamily("tensorgate_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"])
        utilization = GaugeMetricFamily(
            "tensorgate_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran on the GPU (0..1).",
            labels=["gpu", "name"],
        )
        for index, handle, name in self._devices:
            try:
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:  # a GPU that fell off the bus must not break the whole scrape
                log.warning("NVML could not read GPU %s: %s", index, exc)
                continue
            used.add_metric([index, name], float(memory.used))
            total.add_metric([index, name], float(memory.total))
            utilization.add_metric([index, name], rates.gpu / 100.0)
        yield from (used, total, utilization)

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown: %s", exc)


def _import_nvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")  # nvidia-ml-py: optional, and untyped
    except ImportError:
        return None


def nvml_collector(nvml: Any = None) -> _NvmlCollector | None:
    """GPU gauges through NVML (`nvidia-ml-py`), or None where it is not installed or finds no driver or GPU."""
    module = nvml if nvml is not None else _import_nvml()
    if module is None:
        log.debug("GPU metrics off: nvidia-ml-py is not installed")
        return None
    try:
        module.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded on a machine without a GPU
        log.debug("GPU metrics off: NVML did not initialise (%s)", exc)
        return None
    try:
        collector = _NvmlCollector(module)
    except Exception as exc:
        log.warning("GPU metrics off: NVML could not list the GPUs (%s)", exc)
        module.nvmlShutdown()
        return None
    if not collector._devices:
        module.nvmlShutdown()
        return None
    log.info("GPU metrics on: %d GPU(s) through NVML", len(collector._devices))
    return collector
