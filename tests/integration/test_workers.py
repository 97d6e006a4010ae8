"""`tensorgate serve --workers 2` as a real process tree: both workers share one port and serve calls, the parent's
/metrics adds their figures up, SIGTERM drains both and exits 0, and a worker that dies takes the set down."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tensorgate.client import Client
from tensorgate.server import workers as workers_module
from tensorgate.server.workers import merge_worker_metrics
from tests.support.serving import EXAMPLE_MODELS
from tests.support.telemetry import Samples, scrape

#: New connections that SO_REUSEPORT spreads by a hash: with this many, both workers get some unless the kernel
#: sent all of them to one of two listeners (a chance of 2 in 2**24).
CHANNELS = 24
READY = re.compile(r"^tensorgate: (\d+) workers listening on (\S+) \(pids ([\d, ]+)\)$")
METRICS = re.compile(r"^  metrics of all workers on http://(\S+)/metrics$")


@dataclass
class Workers:
    process: subprocess.Popen[str]
    address: str
    metrics: str
    pids: list[int]

    def stop(self) -> tuple[int, str]:
        """SIGTERM the parent; its exit code and the rest of its output."""
        self.process.send_signal(signal.SIGTERM)
        rest, _ = self.process.communicate(timeout=60)
        return self.process.returncode, rest


def _start(repository: Path, *flags: str) -> Workers:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorgate.server.cli",
            "--workers",
            "2",
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--repository",
            str(repository),
            "--grace-period",
            "10",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    ready = None
    for line in process.stdout:
        if ready is None:
            ready = READY.match(line.rstrip("\n"))
        elif metrics := METRICS.match(line.rstrip("\n")):
            count, address, pids = ready.groups()
            assert int(count) == 2
            return Workers(process, address, metrics.group(1), [int(pid) for pid in pids.split(", ")])
    process.kill()
    pytest.fail(f"the workers never listened (exit {process.wait()})")


@pytest.fixture
def workers() -> Iterator[Workers]:
    started = _start(EXAMPLE_MODELS)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.kill()
        started.process.wait(timeout=30)
        if started.process.stdout is not None:
            started.process.stdout.close()


def _total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, items), value in samples.items() if sample == name and wanted <= set(items))


def _per_worker(samples: Samples, name: str) -> dict[int, float]:
    return {int(dict(items)["pid"]): value for (sample, items), value in samples.items() if sample == name}


def test_two_workers_share_the_port_and_the_parent_counts_every_call(workers: Workers) -> None:
    pairs = np.arange(8, dtype=np.float32).reshape(2, 4)
    calls = 0
    for _ in range(CHANNELS):
        with Client(workers.address, timeout=30) as client:  # a new channel: a new connection
            outputs = client.predict("add_sub", {"a": pairs, "b": pairs})
            np.testing.assert_array_equal(outputs["sum"], pairs + pairs)
            calls += 1
    # Client-side balancing as over a headless Service: a dns:/// target with the round_robin policy.
    with Client(f"dns:///{workers.address}", load_balancing="round_robin", timeout=30) as client:
        for _ in range(4):
            client.predict("add_sub", {"a": pairs, "b": pairs})
            calls += 1

    samples = scrape(workers.metrics)

    assert _total(samples, "tensorgate_requests_total", model="add_sub", code="OK") == calls
    assert _total(samples, "tensorgate_requests_total") == calls
    served = _per_worker(samples, "tensorgate_worker_requests_total")
    assert set(served) == set(workers.pids)
    assert all(count > 0 for count in served.values()), f"one worker served every connection: {served}"
    assert sum(served.values()) == calls
    assert _per_worker(samples, "tensorgate_worker_up") == dict.fromkeys(workers.pids, 1.0)
    # Readiness combines as "every worker ready", not as a sum of two.
    assert _total(samples, "tensorgate_model_ready", model="add_sub") == 1.0
    # Histograms add up across workers: one end-to-end observation per call.
    assert _total(samples, "tensorgate_request_duration_seconds_count", model="add_sub") == calls

    code, rest = workers.stop()
    assert code == 0, rest
    assert "tensorgate: draining 2 workers" in rest
    assert rest.count("tensorgate draining") == 2  # each worker drained
    for pid in workers.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_dies_stops_the_others_and_the_parent_exits_1(workers: Workers) -> None:
    os.kill(workers.pids[0], signal.SIGKILL)
    assert workers.process.wait(timeout=60) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(workers.pids[1], 0)


def test_a_worker_drained_on_its_own_is_a_failure_too(workers: Workers) -> None:
    # SIGTERM to one worker (not through the parent): it drains and exits 0, but a set of N-1 must not go on.
    os.kill(workers.pids[0], signal.SIGTERM)
    assert workers.process.wait(timeout=60) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(workers.pids[1], 0)


def test_workers_that_cannot_start_exit_2_like_one_server(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "--workers", "2", "--address", "127.0.0.1:0"],
        env={**os.environ, "TENSORGATE_REPOSITORY": str(missing)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "the model repository is not a directory" in done.stderr


def test_zero_workers_is_refused_naming_the_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tensorgate.server.cli", "--workers", "0", "--repository", str(EXAMPLE_MODELS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "setting 'workers' must be at least 1, got 0" in done.stderr


def test_merging_adds_counters_and_histograms_and_combines_gauges_by_their_rule() -> None:
    one = """# HELP tensorgate_requests_total Calls.
# TYPE tensorgate_requests_total counter
tensorgate_requests_total{model="a",code="OK"} 3.0
# HELP tensorgate_batch_size Rows.
# TYPE tensorgate_batch_size histogram
tensorgate_batch_size_bucket{model="a",le="1.0"} 1.0
tensorgate_batch_size_bucket{model="a",le="+Inf"} 2.0
tensorgate_batch_size_count{model="a"} 2.0
tensorgate_batch_size_sum{model="a"} 3.0
# HELP tensorgate_queue_depth Waiting.
# TYPE tensorgate_queue_depth gauge
tensorgate_queue_depth{model="a"} 2.0
# HELP tensorgate_model_ready Ready.
# TYPE tensorgate_model_ready gauge
tensorgate_model_ready{model="a"} 1.0
"""
    two = one.replace("} 3.0", "} 4.0").replace(
        'tensorgate_model_ready{model="a"} 1.0', 'tensorgate_model_ready{model="a"} 0.0'
    )
    merged = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in merge_worker_metrics([one, two])
        for sample in family.samples
    }
    assert merged[("tensorgate_requests_total", (("code", "OK"), ("model", "a")))] == 7.0
    assert merged[("tensorgate_batch_size_bucket", (("le", "+Inf"), ("model", "a")))] == 4.0
    assert merged[("tensorgate_batch_size_sum", (("model", "a"),))] == 7.0
    assert merged[("tensorgate_queue_depth", (("model", "a"),))] == 4.0
    assert merged[("tensorgate_model_ready", (("model", "a"),))] == 0.0


def test_a_worker_that_cannot_be_read_counts_with_what_it_last_said(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dropping it from the sum would make the merged counters go backwards, which Prometheus reads as a reset.
    said = ['# TYPE tensorgate_requests_total counter\ntensorgate_requests_total{model="a",code="OK"} 7.0\n']

    def scrape_worker(address: str) -> str:
        if not said:
            raise OSError("connection refused")
        return said.pop()

    monkeypatch.setattr(workers_module, "_scrape", scrape_worker)
    collector = workers_module._WorkerCollector(lambda: [workers_module.WorkerReady(0, 4242, "a:1", "m:2")])

    def read() -> dict[str, float]:
        return {
            sample.name: sample.value
            for family in collector.collect()
            for sample in family.samples
            if sample.name in ("tensorgate_requests_total", "tensorgate_worker_up")
        }

    assert read() == {"tensorgate_requests_total": 7.0, "tensorgate_worker_up": 1.0}
    assert read() == {"tensorgate_requests_total": 7.0, "tensorgate_worker_up": 0.0}
