"""Hot reload for real: zero failed calls while models reload under load, broken versions, rescans on signals and
file changes, and files still being written.

Every version of the test model computes y = x + its version number, so each response can be attributed: the
version the response names must be the one whose arithmetic produced its outputs.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.inference import InferenceRequest, InferenceService
from tensorgate.server.repository import Repository, RepositorySettings, VersionState
from tensorgate.v1 import models_pb2, models_pb2_grpc, predict_pb2, predict_pb2_grpc
from tests.support.serving import ServerThread, running_server

__all__ = ["offset_model", "publish_version", "serving_model"]

MODEL = "counter"

CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 2 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 2 ] }} ]
# Requests wait a little for company, so a reload always finds some queued: they must drain, not fail.
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
{extra}
"""


def offset_model(path: Path, offset: float) -> Path:
    """Write y = x + offset over FP32 [batch, 2] to `path` (IR 9, opset 17)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offset"], ["y"])],
        "offset",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.full((1, 2), offset, np.float32), "offset")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def publish_version(model_dir: Path, version: int, offset: float | None = None) -> Path:
    """Publish a version the safe way: write it under a hidden name, then rename it into place (atomic)."""
    staging = model_dir / f".staging-{version}"
    offset_model(staging / "model.onnx", version if offset is None else offset)
    return staging.rename(model_dir / str(version))


def serving_model(repository: Path, name: str = MODEL, versions: tuple[int, ...] = (1,), extra: str = "") -> Path:
    """A model directory whose versions compute y = x + version."""
    model_dir = repository / name
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG.format(name=name, extra=extra))
    for version in versions:
        publish_version(model_dir, version)
    return model_dir


def _predict(channel: grpc.Channel, x: np.ndarray[Any, Any], **kwargs: Any) -> tuple[int, np.ndarray[Any, Any]]:
    request = predict_pb2.PredictRequest(model=MODEL, inputs=[to_tensor("x", x)], **kwargs)
    reply = predict_pb2_grpc.PredictStub(channel).Predict(request, timeout=30)
    return reply.version, from_tensor(reply.outputs[0])


def _model_infer(channel: grpc.Channel, x: np.ndarray[Any, Any]) -> tuple[int, np.ndarray[Any, Any]]:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return int(reply.model_version), np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(x.shape)


def _versions(channel: grpc.Channel, name: str = MODEL) -> dict[int, tuple[int, str]]:
    reply = models_pb2_grpc.ModelsStub(channel).List(models_pb2.ListModelsRequest(), timeout=10)
    status = next(model for model in reply.models if model.name == name)
    return {v.version: (v.state, v.reason) for v in status.versions}


class _Load:
    """Clients calling the model in a loop on their own threads, each response checked and attributed."""

    def __init__(self, address: str, calls: list[Callable[[grpc.Channel, Any], tuple[int, Any]]]) -> None:
        self.errors: list[str] = []
        self.answered = 0
        self.latest = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(address, call, seed), daemon=True)
            for seed, call in enumerate(calls)
        ]

    def _run(self, address: str, call: Callable[[grpc.Channel, Any], tuple[int, Any]], seed: int) -> None:
        rng = np.random.default_rng(seed)
        seen = 0
        with grpc.insecure_channel(address) as channel:
            while not self._stop.is_set():
                x = rng.integers(0, 100, (int(rng.integers(1, 4)), 2)).astype(np.float32)
                try:
                    version, y = call(channel, x)
                except grpc.RpcError as exc:
                    self._fail(f"{exc.code()}: {exc.details()}")
                    continue
                if not np.array_equal(y, x + version):
                    self._fail(f"version {version} answered {y.tolist()} for {x.tolist()}")
                if version < seen:  # the switch is atomic: after seeing a version, never an older one
                    self._fail(f"version {version} answered after version {seen}")
                seen = max(seen, version)
                with self._changed:
                    self.answered += 1
                    self.latest = max(self.latest, version)
                    self._changed.notify_all()

    def _fail(self, error: str) -> None:
        with self._changed:
            self.errors.append(error)
            self._changed.notify_all()

    def wait_for_version(self, version: int) -> None:
        """Until some client got an answer from `version` (fails after a generous bound, or on any error)."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.latest >= version or self.errors, timeout=60), (
                f"no answer from version {version}"
            )
        assert not self.errors, self.errors[:5]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    serving_model(tmp_path / "repository")
    with running_server(tmp_path / "repository", repository_settle=0.0) as running:
        yield running


def test_reloads_under_steady_load_fail_no_call(server: ServerThread) -> None:
    model_dir = server.settings.repository / MODEL
    with (
        grpc.insecure_channel(server.address) as channel,
        _Load(server.address, [_predict, _predict, _model_infer, _model_infer]) as load,
    ):
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        load.wait_for_version(1)
        for version in range(2, 14):  # 12 reloads, each to a version whose outputs differ from the last
            publish_version(model_dir, version)
            shutil.rmtree(model_dir / str(version - 1))  # the serving engine has it in memory already
            if version % 2:
                oip.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60)
            else:
                report = server.call(server.server.repository.rescan())
                assert report.reloaded == [MODEL], report
            load.wait_for_version(version)
    assert not load.errors, load.errors[:5]
    assert load.answered > 12
    with grpc.insecure_channel(server.address) as channel:
        # Every replaced version drained and was freed; only the last one is listed.
        assert _versions(channel) == {13: (models_pb2.VERSION_STATE_READY, "")}


def test_a_request_routed_just_before_its_version_retires_still_runs(server: ServerThread) -> None:
    repository = server.server.repository
    publish_version(repository.root / MODEL, 2)

    async def race() -> tuple[int, list[float]]:
        service = InferenceService(repository)
        request = InferenceRequest(MODEL, {"x": np.array([[1.0, 2.0]], np.float32)}, request_id="raced")
        target = service.route(request)
        assert target.version == 1
        await repository.load_model(MODEL)  # version 2 takes over, version 1 retires
        assert target.state is VersionState.UNLOADING
        result = await service.run(target, request)
        return result.version, result.outputs["y"].tolist()

    assert server.call(race()) == (2, [[3.0, 4.0]])


def test_a_broken_new_version_leaves_the_old_one_serving(server: ServerThread) -> None:
    model_dir = server.settings.repository / MODEL
    (model_dir / ".staging").mkdir()
    (model_dir / ".staging" / "model.onnx").write_bytes(b"not an onnx model")
    (model_dir / ".staging").rename(model_dir / "2")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "version 2" in error.details()
        assert "model.onnx" in error.details()
        x = np.array([[5.0, 6.0]], np.float32)
        assert _predict(channel, x)[0] == 1  # still the old one
        listed = _versions(channel)
        assert listed[1][0] == models_pb2.VERSION_STATE_READY
        assert "reload failed" in listed[1][1]  # the listing says why it still serves the old one
        assert listed[2][0] == models_pb2.VERSION_STATE_FAILED
        assert "model.onnx" in listed[2][1]
        # An unchanged broken version is not retried by rescans; a fixed one (replaced atomically) loads.
        assert server.call(server.server.repository.rescan()).unchanged == [MODEL]
        offset_model(model_dir / "2" / "model.onnx.tmp", 2)
        os.replace(model_dir / "2" / "model.onnx.tmp", model_dir / "2" / "model.onnx")
        report = server.call(server.server.repository.rescan())
        assert (report.reloaded, report.failed) == ([MODEL], {})
        version, y = _predict(channel, x)
        assert (version, y.tolist()) == (2, [[7.0, 8.0]])
        assert _versions(channel) == {2: (models_pb2.VERSION_STATE_READY, "")}


def test_a_half_written_file_is_not_loaded_until_complete(tmp_path: Path) -> None:
    model_dir = serving_model(tmp_path)
    complete = offset_model(tmp_path / "v2.onnx", 2).read_bytes()
    half = len(complete) // 2
    seen_while_settling: list[set[int]] = []

    async def scenario() -> tuple[list[str], dict[int, VersionState], list[list[float]]]:
        repository: Repository

        async def sleep(seconds: float) -> None:
            # A copy in place, still under way during the first settle period; the rest lands in the second.
            seen_while_settling.append(set(repository.model(MODEL).versions))
            if len(seen_while_settling) == 1:
                with (model_dir / "2" / "model.onnx").open("ab") as handle:
                    handle.write(complete[half:])

        repository = Repository(tmp_path, RepositorySettings(settle_seconds=0.5), sleep=sleep)
        await repository.load()
        try:
            (model_dir / "2").mkdir()
            (model_dir / "2" / "model.onnx").write_bytes(complete[:half])
            report = await repository.rescan()
            entry = repository.model(MODEL)
            result = await InferenceService(repository).infer(
                InferenceRequest(MODEL, {"x": np.zeros((1, 2), np.float32)}, request_id="after")
            )
            return report.reloaded, {n: v.state for n, v in entry.versions.items()}, result.outputs["y"].tolist()
        finally:
            await repository.close()

    reloaded, states, y = asyncio.run(scenario())
    assert seen_while_settling == [{1}, {1}]  # nothing loaded while the file was changing, nor in the quiet period
    assert reloaded == [MODEL]
    assert states == {2: VersionState.READY}  # loaded once, complete: it never failed
    assert y == [[2.0, 2.0]]


def test_watch_mode_picks_up_a_new_version(tmp_path: Path) -> None:
    model_dir = serving_model(tmp_path / "repository")
    with running_server(tmp_path / "repository", watch_repository=True, repository_settle=0.05) as running:
        repository = running.server.repository
        running.call(repository.watching.wait())
        changed: queue.Queue[str] = queue.Queue()

        async def listen() -> None:
            async def put(name: str) -> None:
                changed.put(name)

            repository.add_listener(put)

        running.call(listen())
        publish_version(model_dir, 2)
        assert changed.get(timeout=60) == MODEL
        with grpc.insecure_channel(running.address) as channel:
            version, y = _predict(channel, np.ones((1, 2), np.float32))
        assert (version, y.tolist()) == (2, [[3.0, 3.0]])


def _start(repository: Path) -> tuple[subprocess.Popen[str], str, queue.Queue[str], threading.Thread]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorgate.server.cli", "--address", "127.0.0.1:0", "--repository-settle", "0.05"],
        env={**os.environ, "TENSORGATE_REPOSITORY": str(repository), "TENSORGATE_LOG_LEVEL": "INFO"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    logs: queue.Queue[str] = queue.Queue()
    stderr = process.stderr

    def read() -> None:
        for line in stderr:
            logs.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for line in process.stdout:
        if line.startswith("tensorgate listening on "):
            return process, line.split()[-1], logs, reader
    process.kill()
    pytest.fail(f"the server exited ({process.wait()}) without listening")


def _wait_for_log(logs: queue.Queue[str], words: str) -> str:
    while True:
        line = logs.get(timeout=60)
        if words in line:
            return line


def test_sighup_and_sigusr2_rescan_a_subprocess_server(tmp_path: Path) -> None:
    model_dir = serving_model(tmp_path / "repository")
    process, address, logs, reader = _start(tmp_path / "repository")
    try:
        with grpc.insecure_channel(address) as channel:
            assert _predict(channel, np.zeros((1, 2), np.float32))[0] == 1
            for version, signum in ((2, signal.SIGHUP), (3, signal.SIGUSR2)):
                publish_version(model_dir, version)
                process.send_signal(signum)
                assert f"reloaded {MODEL}" in _wait_for_log(logs, "repository rescanned")
                found, y = _predict(channel, np.zeros((1, 2), np.float32))
                assert (found, y.tolist()) == (version, [[float(version)] * 2])
        assert process.poll() is None  # a rescan signal never stops the server
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=30)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
