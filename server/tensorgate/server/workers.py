"""`tensorgate serve --workers N`: N server processes on one address, and the parent that runs them.

One Python process serves with one interpreter lock; N processes use N cores for the Python work around the
engines (decode, batching, encode). They share the listening port through SO_REUSEPORT (Linux): each worker has
its own listening socket and the kernel spreads new connections over them by a hash of the connection's addresses.
A gRPC connection stays on the worker that accepted it, so load spreads with the number of connections (many
clients, or clients balancing over several connections: see the README's "Running on Kubernetes").

The parent:

- resolves the address once: it binds a SO_REUSEPORT socket there that it never listens on (port 0: the kernel
  picks the port), so every worker binds the same port, and the port stays taken until the parent exits;
- spawns the workers (never forks them: gRPC's and ONNX Runtime's threads do not survive a fork), each loading
  its own models, and prints one line when all of them listen;
- forwards SIGTERM and SIGINT to every worker as SIGTERM (each drains: health NOT_SERVING, new calls UNAVAILABLE,
  in-flight calls finish within the grace period), forwards SIGHUP and SIGUSR2 as they are, and exits 0 once every
  worker has drained;
- restarts no worker. A worker that exits on its own makes the parent drain the others and exit 1 (2 when a
  worker could not start, as a single server would), so the supervisor (Kubernetes, systemd) restarts the whole
  set with its own back-off. A half-dead set would keep passing its probes, which reach whichever worker accepts
  the probe's connection.
- serves the metrics of all workers on `--metrics-address`. Not with prometheus_client's multiprocess mode: our
  metrics are made at scrape time by custom collectors (plain numbers kept on each event loop, gauges read from the
  repository; see telemetry/metrics.py), which that mode cannot carry. Each worker serves its own registry on a
  private 127.0.0.1 port instead, and a scrape of the parent scrapes every worker and adds the figures up
  (counters and histograms sum; gauges as `WORKER_GAUGES` says). The parent adds `tensorgate_worker_up` and
  `tensorgate_worker_requests_total` per worker, to show how the kernel spread the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING, Any

from tensorgate.server.addresses import split_address
from tensorgate.server.settings import ServerSettings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric

    from tensorgate.server.app import Server

__all__ = ["FORWARDED_SIGNALS", "STOP_SIGNALS", "WorkerReady", "merge_worker_metrics", "reserve_address", "run_workers"]

log = logging.getLogger(__name__)

#: Signals that make the parent drain every worker (each gets SIGTERM).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Signals passed on to every worker as they are (repository rescan, reload); a worker ignores them until and
#: unless the server installs a handler, so they never kill one.
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)
#: Seconds the parent waits for one worker's /metrics before counting it down for that scrape.
SCRAPE_TIMEOUT = 5.0


@dataclass(frozen=True)
class WorkerReady:
    """What a worker tells the parent once it listens: who it is, and where its own /metrics is ("" if none)."""

    index: int
    pid: int
    address: str
    metrics_address: str


def reserve_address(address: str) -> tuple[socket.socket, str]:
    """Bind a SO_REUSEPORT socket at HOST:PORT without listening; return it and HOST:PORT with the real port.

    While it is open the port is ours: workers bind it too (SO_REUSEPORT), anything else gets "address in use".
    ValueError for a malformed address, OSError when it cannot be bound.
    """
    host, port = split_address(address)
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--workers needs SO_REUSEPORT, which this platform lacks")
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    reservation = socket.socket(family, socket.SOCK_STREAM)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(sockaddr)
    except OSError as exc:
        reservation.close()
        raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
    return reservation, f"{host}:{reservation.getsockname()[1]}"


def run_workers(settings: ServerSettings) -> int:
    """Serve with `settings.workers` processes until SIGTERM/SIGINT; return the exit code (see the module doc)."""
    if settings.workers < 1:
        print(f"error: setting 'workers' must be at least 1, got {settings.workers}", file=sys.stderr)
        return 2
    try:
        reservation, address = reserve_address(settings.address)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with reservation:
        return _Supervisor(replace(settings, address=address)).run()


# -- the worker side ---------------------------------------------------------------------------------------------


def _worker_main(settings: ServerSettings, index: int, channel: Connection) -> None:
    """A worker process: one ordinary server; reports to the parent through `channel` once it listens."""
    # Ctrl-C reaches the whole process group, and the parent passes it on as SIGTERM: a worker still loading its
    # models ignores its own copy. Forwarded signals must not kill a worker whose server has no handler for them.
    for signum in (signal.SIGINT, *FORWARDED_SIGNALS):
        signal.signal(signum, signal.SIG_IGN)
    from tensorgate.server import cli  # here, not at the top: cli imports this module
    from tensorgate.server.telemetry.logging import configure

    configure(settings.log_level, settings.log_format)

    def ready(server: Server) -> None:
        channel.send(WorkerReady(index, os.getpid(), server.address, server.telemetry.metrics_address))
        channel.close()

    sys.exit(asyncio.run(cli._serve(settings, on_ready=ready)))


# -- the parent ----------------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    channel: Connection | None
    ready: WorkerReady | None = None
    exitcode: int | None = None


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler, so the signal wakes the parent through its wakeup fd instead of killing it."""


class _Supervisor:
    """Starts the workers, passes signals on, notices exits, serves the merged metrics."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.workers: list[_Worker] = []
        self.stopping = False
        #: The exit code once a worker failed (exited on its own); None while all is well.
        self.failure: int | None = None
        self._metrics: _MetricsEndpoint | None = None

    def run(self) -> int:
        try:
            self._metrics = _MetricsEndpoint.start(self.settings.metrics_address, self._ready_workers)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        receive, send = socket.socketpair()
        receive.setblocking(False)
        send.setblocking(False)
        previous_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, _ignore) for signum in (*STOP_SIGNALS, *FORWARDED_SIGNALS)}
        try:
            self._start_workers()
            self._supervise(receive)
        except BaseException:
            for worker in self._alive():  # the parent itself is failing: leave no orphans behind
                worker.process.kill()
                worker.process.join()
            raise
        finally:
            signal.set_wakeup_fd(previous_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            receive.close()
            send.close()
            if self._metrics is not None:
                self._metrics.close()
        if self.failure is not None:
            return self.failure
        return 0

    def _start_workers(self) -> None:
        context = multiprocessing.get_context("spawn")
        # Each worker's own registry on a private port; the parent's endpoint is the one to scrape.
        private_metrics = "127.0.0.1:0" if self._metrics is not None else ""
        worker_settings = replace(self.settings, metrics_address=private_metrics)
        for index in range(self.settings.workers):
            receiving, sending = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=(worker_settings, index, sending),
                name=f"tensorgate-worker-{index}",
            )
            process.start()
            sending.close()  # the worker's end; EOF on ours then means the worker is gone
            self.workers.append(_Worker(index, process, receiving))

    def _alive(self) -> list[_Worker]:
        return [worker for worker in self.workers if worker.exitcode is None]

    def _ready_workers(self) -> list[WorkerReady]:
        return [worker.ready for worker in self._alive() if worker.ready is not None]

    def _supervise(self, wakeup: socket.socket) -> None:
        while alive := self._alive():
            by_sentinel = {worker.process.sentinel: worker for worker in alive}
            by_channel = {worker.channel: worker for worker in alive if worker.channel is not None}
            for item in wait([wakeup, *by_sentinel, *by_channel]):
                if item is wakeup:
                    self._on_signals(wakeup.recv(64))
                elif isinstance(item, Connection):
                    self._on_message(by_channel[item])
                elif isinstance(item, int):
                    self._on_exit(by_sentinel[item])

    def _on_signals(self, received: bytes) -> None:
        for signum in received:
            if signum in STOP_SIGNALS:
                if not self.stopping:
                    self.stopping = True
                    print(f"tensorgate: draining {len(self._alive())} workers", flush=True)
                self._send(signal.SIGTERM)
            elif signum in FORWARDED_SIGNALS:
                self._send(signal.Signals(signum))

    def _send(self, signum: signal.Signals) -> None:
        for worker in self._alive():
            pid = worker.process.pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):  # exited a moment ago; its sentinel will tell
                    os.kill(pid, signum)

    def _on_message(self, worker: _Worker) -> None:
        channel = worker.channel
        if channel is None:  # its exit was handled first, in the same wake-up
            return
        try:
            message = channel.recv()
        except EOFError:  # the worker exited before it listened; its sentinel says how
            message = None
        channel.close()
        worker.channel = None
        if isinstance(message, WorkerReady):
            worker.ready = message
            ready = self._ready_workers()
            if len(ready) == self.settings.workers:
                pids = ", ".join(str(each.pid) for each in ready)
                lines = [f"tensorgate: {len(ready)} workers listening on {self.settings.address} (pids {pids})"]
                if self._metrics is not None:
                    lines.append(f"  metrics of all workers on http://{self._metrics.address}/metrics")
                print("\n".join(lines), flush=True)

    def _on_exit(self, worker: _Worker) -> None:
        worker.process.join()
        code = worker.process.exitcode
        worker.exitcode = code if code is not None else 1
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None
        # Clean only when we are stopping: a worker that drains and exits 0 on its own (someone sent it SIGTERM)
        # would otherwise leave a set of N-1 that still passes its probes. A worker stopped by our SIGTERM before
        # its server installed handlers dies of the signal: also a clean stop.
        clean = self.stopping and (worker.exitcode == 0 or -worker.exitcode in (signal.SIGTERM, signal.SIGINT))
        if clean:
            return
        log.error("worker %d (pid %s) exited with %s", worker.index, worker.process.pid, worker.exitcode)
        if self.failure is None:
            self.failure = 2 if worker.ready is None and worker.exitcode == 2 else 1
        if not self.stopping:
            self.stopping = True
            print(
                f"tensorgate: worker {worker.index} exited ({worker.exitcode}); draining the others",
                file=sys.stderr,
                flush=True,
            )
            self._send(signal.SIGTERM)


# -- metrics ---------------------------------------------------------------------------------------------------------


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT) as response:
        text: str = response.read().decode()
    return text


_COMBINE: dict[str, Callable[[float, float], float]] = {
    "sum": lambda a, b: a + b,
    "max": max,
    "min": min,
}


def merge_worker_metrics(texts: Iterable[str]) -> list[Metric]:
    """Several workers' /metrics texts as one set of families: counters and histograms add up, gauges combine as
    `WORKER_GAUGES` says (unlisted ones add up)."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    from tensorgate.server.telemetry.metrics import WORKER_GAUGES

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            combine = _COMBINE[WORKER_GAUGES.get(family.name, "sum") if family.type == "gauge" else "sum"]
            table = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                before = table.get(key)
                table[key] = sample.value if before is None else combine(before, sample.value)
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def _requests_total(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "tensorgate_requests"
        for sample in family.samples
        if sample.name == "tensorgate_requests_total"
    )


class _WorkerCollector:
    """At each scrape of the parent: every ready worker's /metrics, merged, plus per-worker figures."""

    def __init__(self, workers: Callable[[], list[WorkerReady]]) -> None:
        self._workers = workers
        # The last metrics read from each worker (by pid): a worker that cannot be read for one scrape still
        # counts with what it last said, so the merged counters never go backwards (Prometheus would take that
        # for a reset).
        self._last: dict[int, str] = {}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(
            "tensorgate_worker_up",
            "Whether the worker's metrics could be read (1) or not (0).",
            labels=["worker", "pid"],
        )
        served = CounterMetricFamily(
            "tensorgate_worker_requests",
            "Calls each worker process finished (its share of tensorgate_requests_total).",
            labels=["worker", "pid"],
        )
        texts = []
        for worker in self._workers():
            labels = [str(worker.index), str(worker.pid)]
            try:
                text = self._last[worker.pid] = _scrape(worker.metrics_address)
            except OSError as exc:  # a worker draining or gone: the others still report
                log.warning("cannot read the metrics of worker %d (pid %d): %s", worker.index, worker.pid, exc)
                up.add_metric(labels, 0.0)
                last = self._last.get(worker.pid)
                if last is None:
                    continue
                text = last
            else:
                up.add_metric(labels, 1.0)
            texts.append(text)
            served.add_metric(labels, _requests_total(text))
        yield from merge_worker_metrics(texts)
        yield up
        yield served


class _MetricsEndpoint:
    """The parent's /metrics: a registry holding only the worker collector, on its own HTTP thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread, address: str) -> None:
        self._server = server
        self._thread = thread
        self.address = address

    @classmethod
    def start(cls, address: str, workers: Callable[[], list[WorkerReady]]) -> _MetricsEndpoint | None:
        """Serve on HOST:PORT (port 0: a free one); None when `address` is empty or prometheus_client is missing."""
        if not address:
            return None
        host, port = split_address(address, "metrics address")
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as exc:
            from tensorgate.server.telemetry import INSTALL_HINT

            log.warning("metrics are off: %s is not installed (%s)", exc.name, INSTALL_HINT)
            return None
        registry = CollectorRegistry(auto_describe=False)
        collector: Any = _WorkerCollector(workers)  # prometheus_client only calls collect()
        registry.register(collector)
        server, thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
        return cls(server, thread, f"{host}:{server.server_port}")

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
