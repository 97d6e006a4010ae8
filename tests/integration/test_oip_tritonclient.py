"""Conformance from the client people use: tritonclient's gRPC clients against a real tensorgate server.

tritonclient cannot share a process with our `inference` stubs (FACTS.md), and it pins protobuf < 7 while we
need protobuf 7, so it lives in its own virtual environment (`.venv/triton`, made by `make install`, or here on
first use from tests/integration/tritonclient-requirements.txt). One driver run (oip_driver.py) makes every
call and records the answers; the tests below hold them against our own client, ONNX Runtime in-process and
numpy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2

from tensorgate.client import Client
from tensorgate.oip import grpc_service_pb2, model_config_pb2
from tests.support.models import ONNX_TYPES, identity_model
from tests.support.serving import EXAMPLE_MODELS, ServerThread, copy_models, running_server

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("oip_driver.py")
REQUIREMENTS = Path(__file__).with_name("tritonclient-requirements.txt")
TRITON_VENV = ROOT / ".venv" / "triton"
LATE_MODEL = "add_sub_late"


def triton_python() -> Path:
    """The interpreter of the tritonclient venv ($TENSORGATE_TRITON_PYTHON, or .venv/triton, made if missing)."""
    configured = os.environ.get("TENSORGATE_TRITON_PYTHON")
    if configured:
        return Path(configured)
    python = TRITON_VENV / "bin" / "python"
    stamp = TRITON_VENV / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(TRITON_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
            check=True,
        )
        stamp.touch()
    return python


def identity_inputs() -> dict[str, npt.NDArray[Any]]:
    """Three rows of two values per datatype, as stored in the driver's .npz (BYTES as S, BF16 as uint16)."""
    rng = np.random.default_rng(4)
    arrays: dict[str, npt.NDArray[Any]] = {
        "BOOL": np.array([[True, False], [False, False], [True, True]]),
        "BYTES": np.array([[b"hello", b""], ["\u00e9t\u00e9".encode(), b"a b"], [b"x" * 40, b"0"]], dtype=np.bytes_),
        "BF16": np.array([[1.5, -2.0], [0.0, 3.25], [-0.125, 1e10]], dtype=ml_dtypes.bfloat16).view(np.uint16),
    }
    dtype: Any
    for datatype, dtype in (
        ("UINT8", np.uint8),
        ("UINT16", np.uint16),
        ("UINT32", np.uint32),
        ("UINT64", np.uint64),
        ("INT8", np.int8),
        ("INT16", np.int16),
        ("INT32", np.int32),
        ("INT64", np.int64),
    ):
        info = np.iinfo(dtype)
        arrays[datatype] = np.array([[info.min, info.max], [0, 1], [7, info.max - 1]], dtype=dtype)
    for datatype, dtype in (("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64)):
        arrays[datatype] = rng.normal(0, 100, (3, 2)).astype(dtype)
    return arrays


def descriptor_set() -> bytes:
    """Our Open Inference Protocol contract, as a serialized FileDescriptorSet."""
    files = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, grpc_service_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    return files.SerializeToString()


class DriverRun:
    """What one driver run recorded, plus what the test process computed to compare with."""

    def __init__(self, results: dict[str, Any], outputs: dict[str, npt.NDArray[Any]], given: dict[str, Any]) -> None:
        self.results = results
        self.outputs = outputs
        self.given = given
        self.ours: dict[str, npt.NDArray[Any]] = {}


@pytest.fixture(scope="module")
def oip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A server over digits, add_sub and an identity model per datatype."""
    repository = copy_models(tmp_path_factory.mktemp("oip-repository"), "digits", "add_sub")
    for datatype, onnx_type in ONNX_TYPES.items():
        identity_model(repository / f"identity_{datatype.lower()}" / "1" / "model.onnx", onnx_type)
    with running_server(repository) as server:
        yield server


@pytest.fixture(scope="module")
def driver(oip_server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> DriverRun:
    """Run the tritonclient driver once against the server, and our own client beside it."""
    work = tmp_path_factory.mktemp("oip-driver")
    rng = np.random.default_rng(7)
    given: dict[str, npt.NDArray[Any]] = {
        "image": rng.uniform(0, 16, (5, 1, 8, 8)).astype(np.float32),
        "a": rng.uniform(-8, 8, (3, 4)).astype(np.float32),
        "b": rng.uniform(-8, 8, (3, 4)).astype(np.float32),
    }
    given |= {f"identity/{name}": array for name, array in identity_inputs().items()}
    arrays: dict[str, Any] = given
    np.savez(work / "inputs.npz", **arrays)
    (work / "contract.pb").write_bytes(descriptor_set())
    # A model directory that appears after the server started: the driver loads it by name.
    shutil.copytree(EXAMPLE_MODELS / "add_sub", oip_server.settings.repository / LATE_MODEL)
    plan = {
        "address": oip_server.address,
        "inputs": str(work / "inputs.npz"),
        "descriptors": str(work / "contract.pb"),
        "models": ["digits", "add_sub", "identity_fp32"],
        "datatypes": list(ONNX_TYPES),
        "late_model": LATE_MODEL,
        "out": str(work),
    }
    (work / "plan.json").write_text(json.dumps(plan))
    completed = subprocess.run(
        [str(triton_python()), str(DRIVER), str(work / "plan.json")],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, f"the driver failed:\n{completed.stdout}\n{completed.stderr}"
    run = DriverRun(
        json.loads((work / "results.json").read_text()),
        dict(np.load(work / "outputs.npz", allow_pickle=False)),
        given,
    )
    with Client(oip_server.address, timeout=30) as client:
        run.ours = {
            f"digits/{name}": array for name, array in client.predict("digits", {"image": given["image"]}).items()
        }
        run.ours |= {
            f"add_sub/{name}": array
            for name, array in client.predict("add_sub", {"a": given["a"], "b": given["b"]}).items()
        }
    return run


def _status(entry: dict[str, Any]) -> str:
    assert "error" in entry, f"expected an error, got {entry}"
    status: str = entry["error"]["status"]
    return status


# -- the contract -------------------------------------------------------------------------------------------


def test_contract_matches_tritonclients_compiled_proto(driver: DriverRun) -> None:
    contract = driver.results["contract"]
    assert contract["checked"] > 200
    assert contract["problems"] == []


# -- health and metadata -------------------------------------------------------------------------------------


def test_liveness_and_readiness(driver: DriverRun) -> None:
    assert driver.results["server_live"] is True
    assert driver.results["server_ready"] is True
    assert driver.results["model_ready"] == {"digits": True, "digits/1": True, "digits/7": False, "nope": False}


def test_server_and_model_metadata(driver: DriverRun) -> None:
    server = driver.results["server_metadata"]
    assert server["name"] == "tensorgate"
    assert {"model_repository", "statistics", "model_configuration"} <= set(server["extensions"])
    digits = driver.results["model_metadata"]["digits"]
    assert digits["name"] == "digits"
    assert digits["versions"] == ["1"]
    assert digits["platform"] == "onnxruntime_onnx"
    assert digits["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in digits["outputs"]] == [
        ("probabilities", "FP32", ["-1", "10"]),
        ("label", "INT64", ["-1"]),
    ]
    identity = driver.results["model_metadata"]["identity_fp32"]
    assert identity["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "2"]}]


def test_model_config(driver: DriverRun) -> None:
    digits = driver.results["model_config"]["digits"]
    assert digits["name"] == "digits"
    assert digits["platform"] == "onnxruntime_onnx"
    assert digits["backend"] == "onnxruntime"
    assert digits["max_batch_size"] == 64
    assert digits["input"][0] == {"name": "image", "data_type": "TYPE_FP32", "dims": ["1", "8", "8"]}
    assert [o["name"] for o in digits["output"]] == ["probabilities", "label"]
    assert digits["dynamic_batching"]["preferred_batch_size"] == [16, 32]
    assert digits["instance_group"][0]["count"] == 2
    # add_sub has no config.pbtxt: the config is derived from the model, batching included.
    add_sub = driver.results["model_config"]["add_sub"]
    assert add_sub["max_batch_size"] == 64
    assert [i["name"] for i in add_sub["input"]] == ["a", "b"]
    assert "dynamic_batching" in add_sub


# -- inference ------------------------------------------------------------------------------------------------


def test_sync_infer_matches_our_client_and_onnxruntime(driver: DriverRun) -> None:
    image = driver.given["image"]
    session = ort.InferenceSession(str(EXAMPLE_MODELS / "digits" / "1" / "model.onnx"))
    probabilities, label = session.run(["probabilities", "label"], {"image": image})
    assert driver.results["sync_id"] == "sync-1"
    np.testing.assert_allclose(driver.outputs["sync/probabilities"], probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(driver.outputs["sync/label"], label)
    np.testing.assert_array_equal(driver.outputs["sync/probabilities"], driver.ours["digits/probabilities"])
    np.testing.assert_array_equal(driver.outputs["sync/label"], driver.ours["digits/label"])
    np.testing.assert_array_equal(driver.outputs["sync/with_parameters"], label)


def test_classification_gives_the_top_classes(driver: DriverRun) -> None:
    probabilities = driver.ours["digits/probabilities"]
    assert driver.results["classification_outputs"] == ["probabilities"]
    got = driver.outputs["sync/classification"]
    assert got.shape == (5, 3)
    for row, entries in zip(probabilities, got, strict=True):
        top = np.argsort(-row, kind="stable")[:3]
        assert [entry.decode() for entry in entries] == [f"{row[i]:f}:{i}" for i in top]


def test_async_and_asyncio_infer(driver: DriverRun) -> None:
    a, b = driver.given["a"], driver.given["b"]
    assert driver.results["async_error"] is None
    assert driver.results["async_id"] == "async-1"
    np.testing.assert_array_equal(driver.outputs["async/sum"], a + b)
    np.testing.assert_array_equal(driver.outputs["async/difference"], a - b)
    np.testing.assert_array_equal(driver.outputs["async/sum"], driver.ours["add_sub/sum"])
    assert driver.results["aio_ready"] is True
    assert driver.results["aio_id"] == "aio-1"
    assert driver.results["aio_metadata_name"] == "add_sub"
    np.testing.assert_array_equal(driver.outputs["aio/sum"], a + b)


def test_stream_answers_every_request_in_order_and_stays_open(driver: DriverRun) -> None:
    a, b = driver.given["a"], driver.given["b"]
    first, bad, unknown, last = driver.results["stream"]
    assert first["id"] == "s-1"
    np.testing.assert_array_equal(np.array(first["sum"], np.float32), a + b)
    assert "'a'" in bad["error"]
    assert "shape" in bad["error"]
    assert "nope" in unknown["error"]
    assert last["id"] == "s-4"
    np.testing.assert_array_equal(np.array(last["sum"], np.float32), b + a)


@pytest.mark.parametrize("datatype", list(ONNX_TYPES))
def test_every_datatype_round_trips(driver: DriverRun, datatype: str) -> None:
    entry = driver.results["identity"][datatype]
    assert "error" not in entry, entry
    assert entry["datatype"] == datatype
    sent = driver.given[f"identity/{datatype}"]
    got = driver.outputs[f"identity/{datatype}"]
    assert got.shape == sent.shape
    np.testing.assert_array_equal(got, sent)


# -- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "status", "words"),
    [
        ("unknown_model", grpc.StatusCode.NOT_FOUND, ["nope"]),
        ("unknown_version", grpc.StatusCode.NOT_FOUND, ["version 7"]),
        ("wrong_dtype", grpc.StatusCode.INVALID_ARGUMENT, ["'image'", "FP64"]),
        ("wrong_shape", grpc.StatusCode.INVALID_ARGUMENT, ["'image'", "shape"]),
        ("bad_priority", grpc.StatusCode.INVALID_ARGUMENT, ["priority 9"]),
        ("metadata_unknown", grpc.StatusCode.NOT_FOUND, ["nope"]),
    ],
)
def test_errors_reach_tritonclient_with_our_codes(
    driver: DriverRun, case: str, status: grpc.StatusCode, words: list[str]
) -> None:
    entry = driver.results["errors"][case]
    assert _status(entry) == str(status)
    for word in words:
        assert word in entry["error"]["message"]


# -- statistics, index, load and unload ---------------------------------------------------------------------


def _stats(reply: dict[str, Any]) -> dict[str, Any]:
    (model,) = reply["model_stats"]
    stats: dict[str, Any] = model
    return stats


def test_statistics_count_what_tritonclient_sent(driver: DriverRun) -> None:
    before, after = _stats(driver.results["statistics_before"]), _stats(driver.results["statistics_after"])
    assert (before["name"], before["version"]) == ("add_sub", "1")

    def count(stats: dict[str, Any], key: str) -> int:
        return int(stats["inference_stats"][key].get("count", 0))

    # The driver sent add_sub: async 1, asyncio 1, stream 2 good + 1 bad shape (the unknown model never reached it).
    assert count(after, "success") - count(before, "success") == 4
    assert count(after, "fail") - count(before, "fail") == 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert count(after, key) - count(before, key) == 4
        assert int(after["inference_stats"][key]["ns"]) >= int(before["inference_stats"][key].get("ns", 0))
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 4 * 3  # rows
    assert int(after["execution_count"]) > int(before.get("execution_count", 0))
    assert int(after["last_inference"]) > 0
    assert {int(batch["batch_size"]) for batch in after["batch_stats"]} >= {3}
    names = {(stats["name"], stats["version"]) for stats in driver.results["statistics_all"]["model_stats"]}
    assert {("digits", "1"), ("add_sub", "1"), ("identity_bytes", "1")} <= names


def test_repository_index(driver: DriverRun) -> None:
    index = {(m["name"], m.get("version", "")): m for m in driver.results["index"]["models"]}
    assert index[("digits", "1")]["state"] == "READY"
    assert index[("add_sub", "1")]["state"] == "READY"
    assert len(index) == 2 + len(ONNX_TYPES)


def test_unload_then_load_again(driver: DriverRun, oip_server: ServerThread) -> None:
    lifecycle = driver.results["lifecycle"]
    assert lifecycle["ready_after_unload"] is False
    assert _status(lifecycle["infer_after_unload"]) == str(grpc.StatusCode.UNAVAILABLE)
    assert "unloaded" in lifecycle["infer_after_unload"]["error"]["message"]
    unloaded = [m for m in lifecycle["index_after_unload"]["models"] if m["name"] == "add_sub"]
    assert unloaded == [{"name": "add_sub", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert lifecycle["ready_after_load"] is True
    a, b = driver.given["a"], driver.given["b"]
    np.testing.assert_array_equal(driver.outputs["reloaded/sum"], a + b)
    assert lifecycle["late_ready_before"] is False
    assert lifecycle["late_ready_after"] is True
    np.testing.assert_array_equal(driver.outputs["late/sum"], a + b)
    assert _status(lifecycle["load_missing"]) == str(grpc.StatusCode.NOT_FOUND)
    assert _status(lifecycle["unload_missing"]) == str(grpc.StatusCode.NOT_FOUND)
    # Our own API sees the same repository.
    with Client(oip_server.address, timeout=30) as client:
        assert client.ready(LATE_MODEL)
        assert client.health(LATE_MODEL) == "SERVING"
