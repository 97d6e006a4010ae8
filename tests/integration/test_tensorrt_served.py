"""A `tensorrt_plan` model served by the real server on the CPU simulator of TensorRT and CUDA.

The server runs in a thread of this process (tests/support/serving.py), so the simulator's fake `tensorrt` and
`cuda.bindings.runtime` modules in sys.modules are what its TensorRT engine imports. This verifies our serving
and orchestration of TensorRT, not TensorRT itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tensorgate.client import Client
from tensorgate.client.errors import InternalError, InvalidArgumentError, TensorgateClientError
from tensorgate.engines import plans
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tests.support.gpu_simulator import GpuSimulator
from tests.support.serving import EXAMPLE_MODELS, ServerThread, running_server

DIGITS_ONNX = EXAMPLE_MODELS / "digits" / "1" / "model.onnx"


def _config(name: str, max_batch_size: int, depth: int, instances: int, tensors: str = "") -> str:
    return f"""
name: "{name}"
platform: "tensorrt_plan"
max_batch_size: {max_batch_size}
{tensors}
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
instance_group [{{ count: {instances} kind: KIND_GPU }}]
parameters [
  {{ key: "pipeline_depth" value: {{ string_value: "{depth}" }} }},
  {{ key: "fallback" value: {{ string_value: "none" }} }}
]
"""


DIGITS_TENSORS = """
input [{ name: "image" data_type: TYPE_FP32 dims: [1, 8, 8] }]
output [
  { name: "probabilities" data_type: TYPE_FP32 dims: [10] },
  { name: "label" data_type: TYPE_INT64 dims: [] }
]
"""


def _plan_model(sim: GpuSimulator, repo: Path, name: str, *, plan_max: int, config_max: int, instances: int) -> None:
    """The bundled digits model as a TensorRT plan built by the simulator, with a plan profile up to `plan_max`."""
    version = repo / name / "1"
    version.mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(_config(name, config_max, 2, instances, DIGITS_TENSORS))
    settings = plans.BuildSettings(opt_batch=min(4, plan_max), max_batch=plan_max)
    (version / "model.plan").write_bytes(plans.build_plan(sim.tensorrt, DIGITS_ONNX, settings, timing_cache=None))


def _wide_model(sim: GpuSimulator, repo: Path) -> None:
    """y = x over [batch, n], a plan whose profile takes n from 1 to 4 while the config takes any n."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    version = repo / "wide_trt" / "1"
    version.mkdir(parents=True)
    onnx.save(model, version / "model.onnx")
    (repo / "wide_trt" / "config.pbtxt").write_text(_config("wide_trt", 8, 2, 1))
    settings = plans.BuildSettings(opt_batch=4, max_batch=8, shapes={"x": ((1, 1), (4, 2), (8, 4))})
    plan = plans.build_plan(sim.tensorrt, version / "model.onnx", settings, timing_cache=None)
    (version / "model.plan").write_bytes(plan)


@pytest.fixture(scope="module")
def simulator() -> Iterator[GpuSimulator]:
    sim = GpuSimulator()
    with sim.installed():
        yield sim
    sim.assert_clean()  # after the server stopped: every engine freed everything


@pytest.fixture(scope="module")
def server(simulator: GpuSimulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("trt")
    _plan_model(simulator, repo, "digits_trt", plan_max=8, config_max=8, instances=2)
    _wide_model(simulator, repo)
    with running_server(repo) as thread:
        yield thread


def _reference(images: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
    session = ort.InferenceSession(str(DIGITS_ONNX), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, (np.asarray(v) for v in session.run(names, {"image": images})), strict=True))


def _images(rows: int, seed: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).uniform(0, 16, (rows, 1, 8, 8)).astype(np.float32)


def test_served_by_tensorrt_with_onnxruntime_numbers(server: ServerThread) -> None:
    with Client(server.address) as client:
        metadata = client.metadata("digits_trt")
        for rows in (1, 3, 8):
            images = _images(rows, rows)
            outputs = client.predict("digits_trt", {"image": images})
            expected = _reference(images)
            np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-5)
            np.testing.assert_array_equal(outputs["label"], expected["label"])
    assert metadata.platform == "tensorrt_plan"
    assert metadata.engine.startswith("tensorrt 10.13.0-sim (tensorgate simulated GPU, sm_89; 2 contexts x depth 2")


def test_concurrent_requests_are_batched_onto_the_contexts(server: ServerThread) -> None:
    inputs = [_images(1 + i % 3, 100 + i) for i in range(24)]
    with Client(server.address) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda images: client.predict("digits_trt", {"image": images}), inputs))
    for images, outputs in zip(inputs, results, strict=True):
        np.testing.assert_allclose(outputs["probabilities"], _reference(images)["probabilities"], rtol=1e-5)


def test_a_failing_enqueue_fails_that_request_and_the_server_keeps_serving(
    server: ServerThread, simulator: GpuSimulator
) -> None:
    images = _images(2, 7)
    with Client(server.address) as client:
        simulator.fail_next("execute_async_v3")
        with pytest.raises(InternalError, match="execute_async_v3") as raised:
            client.predict("digits_trt", {"image": images})
        assert isinstance(raised.value, TensorgateClientError)
        simulator.fail_next("cudaMemcpyAsync")
        with pytest.raises(TensorgateClientError, match="cudaMemcpyAsync"):
            client.predict("digits_trt", {"image": images})
        outputs = client.predict("digits_trt", {"image": images})
    np.testing.assert_allclose(outputs["probabilities"], _reference(images)["probabilities"], rtol=1e-5)


def test_a_shape_outside_the_profile_is_invalid_argument(server: ServerThread) -> None:
    # Refused by the server's request checks (the engine's TensorSpec.min_shape/max_shape), else by the engine
    # itself before it queues anything (tests/unit/test_tensorrt_engine.py covers that second line).
    with Client(server.address) as client:
        with pytest.raises(InvalidArgumentError, match=r"'x' has shape \[2, 6\], outside"):
            client.predict("wide_trt", {"x": np.ones((2, 6), np.float32)})
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(client.predict("wide_trt", {"x": x})["y"], x)


def test_unload_frees_the_models_gpu_objects(server: ServerThread, simulator: GpuSimulator) -> None:
    before = simulator.live()
    # wide_trt: 1 context x depth 2 slots x 2 tensors (x, y), pinned and on the device; 3 streams; 3 events a slot.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="wide_trt"), timeout=60)
    after = simulator.live()
    assert (before["device"] - after["device"], before["host"] - after["host"]) == (4, 4)
    assert (before["stream"] - after["stream"], before["event"] - after["event"]) == (3, 6)
    assert before["context"] - after["context"] == 1
    with Client(server.address) as client:  # the rest still serves
        assert client.predict("digits_trt", {"image": _images(1, 3)})["probabilities"].shape == (1, 10)
