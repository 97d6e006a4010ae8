"""Overload protection on the real server: per-client rate limits, retry hints, the circuit breaker, client retries.

The breaker tests use a test engine registered here (platform "flaky_test") that fails every batch while
`FlakyEngine.failing` is set; the queue test holds batches in the gate engine of `oip_engines`.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, ClassVar, cast

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorgate.client import Client, ResourceExhaustedError, UnavailableError
from tensorgate.client._retry import NO_RETRIES, RETRY_SERVICE_CONFIG, RETRY_SERVICE_CONFIG_JSON
from tensorgate.client.tensors import to_tensor
from tensorgate.engines import EngineSettings, TensorSpec, register_engine
from tensorgate.oip import grpc_service_pb2 as oip
from tensorgate.oip import grpc_service_pb2_grpc as oip_grpc
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, stream_pb2, stream_pb2_grpc
from tests.integration.oip_engines import GateEngine, add_gate_model
from tests.support.serving import ServerThread, copy_models, running_server
from tests.support.telemetry import scrape, wait_for

PUSHBACK, RETRY_AFTER = "grpc-retry-pushback-ms", "retry-after"


class FlakyEngine:
    """y = x over FP32 [-1, 1]; every batch fails while `failing` is set. Counts the batches it is given."""

    failing: ClassVar[bool] = False
    # When not empty, only these versions fail while `failing` is set.
    failing_versions: ClassVar[set[int]] = set()
    batches: ClassVar[int] = 0

    def __init__(self, settings: EngineSettings) -> None:
        self.version = int(settings.model_file.parent.name)
        self.inputs = (TensorSpec("x", np.dtype(np.float32), (-1, 1)),)
        self.outputs = (TensorSpec("y", np.dtype(np.float32), (-1, 1)),)
        self.instance_count = 1
        self.description = "flaky (test engine)"

    async def load(self) -> None:
        return None

    async def warmup(self) -> None:
        return None

    async def infer(
        self, inputs: Mapping[str, npt.NDArray[Any]], *, instance: int = 0, outputs: Sequence[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        FlakyEngine.batches += 1
        if FlakyEngine.failing and (not FlakyEngine.failing_versions or self.version in FlakyEngine.failing_versions):
            raise RuntimeError("injected engine failure")
        return {"y": np.array(inputs["x"], np.float32)}

    async def close(self) -> None:
        return None


register_engine("flaky_test", backend="flaky_test", target=f"{__name__}:FlakyEngine", default_filename="model.flaky")

FLAKY_CONFIG = """
name: "flaky"
platform: "flaky_test"
max_batch_size: 8
input [ { name: "x", data_type: TYPE_FP32, dims: [ 1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1 ] } ]
"""


def _add_flaky_model(repository: Path, versions: tuple[int, ...] = (1,)) -> Path:
    for version in versions:
        (repository / "flaky" / str(version)).mkdir(parents=True)
    (repository / "flaky" / "config.pbtxt").write_text(FLAKY_CONFIG + "version_policy { all { } }\n")
    FlakyEngine.failing = False
    FlakyEngine.failing_versions = set()
    FlakyEngine.batches = 0
    return repository


def _add_sub_request(**fields: Any) -> predict_pb2.PredictRequest:
    ones = np.ones((1, 4), np.float32)
    return predict_pb2.PredictRequest(model="add_sub", inputs=[to_tensor("a", ones), to_tensor("b", ones)], **fields)


def _x_request(model: str) -> predict_pb2.PredictRequest:
    return predict_pb2.PredictRequest(model=model, inputs=[to_tensor("x", np.ones((1, 1), np.float32))])


def _refusal(call: Any, request: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30, **kwargs)
    return caught.value


def _hint(error: grpc.RpcError) -> tuple[int, int]:
    """The retry hint a refusal carries (pushback ms, retry-after s), checked to be well formed and consistent."""
    trailers = dict(cast(Any, error).trailing_metadata() or ())
    assert PUSHBACK in trailers, f"no retry hint in {trailers}"
    assert RETRY_AFTER in trailers
    pushback, after = int(trailers[PUSHBACK]), int(trailers[RETRY_AFTER])
    assert pushback > 0
    assert after == math.ceil(pushback / 1000)
    return pushback, after


# -- rate limit ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    # Two requests at once per client, then one per 100 s: nothing refills while a test runs.
    repository = copy_models(tmp_path_factory.mktemp("limited"), "add_sub")
    with running_server(repository, rate_limit=0.01, rate_limit_burst=2) as server:
        yield server


def test_rate_limit_paces_one_client_and_not_another(limited: ServerThread) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        alice, bob = (("x-client-id", "alice"),), (("x-client-id", "bob"),)
        for _ in range(2):
            predict(_add_sub_request(), timeout=30, metadata=alice)
        error = _refusal(predict, _add_sub_request(), metadata=alice)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in (error.details() or "")
        assert "alice" in (error.details() or "")
        pushback, _ = _hint(error)
        assert pushback <= 100_000  # at most the time one token takes at 0.01 per second
        # Bob has his own bucket: alice's refusals cost him nothing.
        for _ in range(2):
            assert predict(_add_sub_request(), timeout=30, metadata=bob).outputs
        # Only inference is limited: alice may still look at the models.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="add_sub"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_rate_limit_covers_both_apis_and_stream_opens(limited: ServerThread) -> None:
    carol = (("x-client-id", "carol"),)
    with grpc.insecure_channel(limited.address) as channel:
        predict_pb2_grpc.PredictStub(channel).Predict(_add_sub_request(), timeout=30, metadata=carol)
        infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        ones = np.ones((1, 4), np.float32).tobytes()
        request = oip.ModelInferRequest(
            model_name="add_sub",
            inputs=[oip.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[1, 4]) for name in "ab"],
            raw_input_contents=[ones, ones],
        )
        infer(request, timeout=30, metadata=carol)  # the same bucket: its second token
        error = _refusal(infer, request, metadata=carol)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _hint(error)
        # Opening a stream takes a token too: carol has none left.
        config = stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="add_sub"))
        responses = stream_pb2_grpc.StreamStub(channel).Stream(iter([config]), timeout=30, metadata=carol)
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _hint(caught.value)


def test_calls_without_a_client_id_count_against_their_peer_address(limited: ServerThread) -> None:
    with Client(limited.address) as client:
        inputs = {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}
        client.predict("add_sub", inputs)
        client.predict("add_sub", inputs)
        with pytest.raises(ResourceExhaustedError, match=r"peer:ipv4:127\.0\.0\.1"):
            client.predict("add_sub", inputs)


# -- retry hint on a full queue ---------------------------------------------------------------------------------


def test_a_full_queue_answers_with_a_retry_hint(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    add_gate_model(repository)  # max_queue_size 2, one instance, batches held until the gate opens
    with running_server(repository) as server, grpc.insecure_channel(server.address) as channel:
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        held: list[Any] = []
        try:
            held.append(predict.future(_x_request("gate"), timeout=60))
            assert GateEngine.entered.wait(30)  # the first batch is in the engine, the instance busy
            held += [predict.future(_x_request("gate"), timeout=60) for _ in range(2)]
            batcher = server.server.repository.resolve("gate").batcher
            assert batcher is not None
            wait_for(lambda: batcher.queue_depth == 2, what="two requests to be queued")
            error = _refusal(predict, _x_request("gate"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue full" in (error.details() or "")
            assert _hint(error) == (1000, 1)
        finally:
            GateEngine.gate.set()
        assert all(future.result(timeout=30).outputs for future in held)


# -- circuit breaker --------------------------------------------------------------------------------------------


def _watch_until(responses: Iterator[health_pb2.HealthCheckResponse], status: int) -> None:
    """Read a health Watch until it reports `status` (the call's own deadline bounds the wait)."""
    for response in responses:
        if response.status == status:
            return
    raise AssertionError(f"the health watch ended before reporting {status}")


def _breaker_gauge(metrics: str) -> float:
    return scrape(metrics)[("tensorgate_breaker_state", (("model", "flaky"), ("version", "1")))]


def test_breaker_takes_a_failing_version_out_of_rotation_and_back(tmp_path: Path) -> None:
    repository = _add_flaky_model(copy_models(tmp_path / "models", "add_sub"))
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    # A cool-down long enough that the checks while open happen inside it, short enough to wait for.
    with (
        running_server(repository, breaker_failures=2, breaker_cooldown=2.5, metrics_address="127.0.0.1:0") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        metrics = server.server.telemetry.metrics_address
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="flaky"), timeout=60)
        try:
            _watch_until(watch, serving)
            FlakyEngine.failing = True
            for _ in range(2):
                error = _refusal(predict, _x_request("flaky"))
                assert error.code() == grpc.StatusCode.INTERNAL
                assert "injected engine failure" in (error.details() or "")
            _watch_until(watch, not_serving)
            assert _breaker_gauge(metrics) == 2.0  # set before health is published

            # Out of rotation: refused at once, the engine not called, with the cool-down left as the hint.
            batches = FlakyEngine.batches
            error = _refusal(predict, _x_request("flaky"))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "out of rotation" in (error.details() or "")
            pushback, _ = _hint(error)
            assert pushback <= 2500
            infer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            oip_request = oip.ModelInferRequest(
                model_name="flaky",
                inputs=[oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 1])],
                raw_input_contents=[np.ones((1, 1), np.float32).tobytes()],
            )
            assert _refusal(infer, oip_request).code() == grpc.StatusCode.UNAVAILABLE  # both APIs
            with Client(server.address, options=NO_RETRIES) as client, pytest.raises(UnavailableError):
                client.predict("flaky", {"x": np.ones((1, 1), np.float32)})
            assert FlakyEngine.batches == batches
            # Other models are not affected.
            assert predict(_add_sub_request(), timeout=30).outputs

            # The engine recovers. Our client's retry honours the hint: it waits out the cool-down and its
            # retry is the trial request, which closes the breaker.
            FlakyEngine.failing = False
            with Client(server.address) as client:
                outputs = client.predict("flaky", {"x": np.full((1, 1), 3.0, np.float32)})
            np.testing.assert_array_equal(outputs["y"], [[3.0]])
            _watch_until(watch, serving)
            assert wait_for(lambda: _breaker_gauge(metrics) == 0.0, what="the breaker gauge to show closed")
            assert predict(_x_request("flaky"), timeout=30).outputs
        finally:
            FlakyEngine.failing = False
            cast(Any, watch).cancel()


def test_unpinned_requests_route_around_a_version_whose_breaker_is_open(tmp_path: Path) -> None:
    repository = _add_flaky_model(tmp_path, versions=(1, 2))
    with (
        running_server(repository, breaker_failures=2, breaker_cooldown=60) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        predict = predict_pb2_grpc.PredictStub(channel).Predict
        assert predict(_x_request("flaky"), timeout=30).version == 2  # the highest ready version
        FlakyEngine.failing, FlakyEngine.failing_versions = True, {2}
        try:
            for _ in range(2):
                assert _refusal(predict, _x_request("flaky")).code() == grpc.StatusCode.INTERNAL
            # Version 2 is out of rotation: unpinned requests go to version 1 instead of failing...
            for _ in range(3):
                assert predict(_x_request("flaky"), timeout=30).version == 1
            # ...while a request pinned to version 2 hears that it is out of rotation.
            pinned = _x_request("flaky")
            pinned.version = 2
            error = _refusal(predict, pinned)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "out of rotation" in (error.details() or "")
        finally:
            FlakyEngine.failing, FlakyEngine.failing_versions = False, set()


def test_breaker_off_keeps_answering_internal(tmp_path: Path) -> None:
    repository = _add_flaky_model(tmp_path)
    with running_server(repository, breaker_failures=0) as server, grpc.insecure_channel(server.address) as channel:
        FlakyEngine.failing = True
        try:
            predict = predict_pb2_grpc.PredictStub(channel).Predict
            codes = {_refusal(predict, _x_request("flaky")).code() for _ in range(8)}
            assert codes == {grpc.StatusCode.INTERNAL}
            assert FlakyEngine.batches == 8
        finally:
            FlakyEngine.failing = False


# -- client retries ---------------------------------------------------------------------------------------------


class _Flaky(predict_pb2_grpc.PredictServicer):
    """A Predict service that fails the first `failures` attempts with `code`, recording each attempt's
    `grpc-previous-rpc-attempts` header (set by gRPC's retry on attempts after the first)."""

    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures = failures
        self.code = code
        self.attempts: list[str | None] = []
        self._lock = threading.Lock()

    def Predict(  # noqa: N802 (the gRPC method's name)
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        with self._lock:
            previous = dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts")
            self.attempts.append(None if previous is None else str(previous))
            attempt = len(self.attempts)
        if attempt <= self.failures:
            context.abort(self.code, f"attempt {attempt} refused")
        return predict_pb2.PredictResponse(
            model=request.model, version=1, outputs=[to_tensor("y", np.ones((1, 1), np.float32))]
        )


@pytest.fixture
def flaky_service() -> Iterator[tuple[str, list[_Flaky]]]:
    """A real gRPC server whose Predict servicer the test sets (in the list it gets)."""
    holder: list[_Flaky] = []

    class Delegate(predict_pb2_grpc.PredictServicer):
        def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
            return holder[0].Predict(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    predict_pb2_grpc.add_PredictServicer_to_server(Delegate(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", holder
    finally:
        server.stop(None)


def test_client_retries_unavailable_by_default(flaky_service: tuple[str, list[_Flaky]]) -> None:
    address, holder = flaky_service
    holder.append(_Flaky(2, grpc.StatusCode.UNAVAILABLE))
    with Client(address) as client:
        assert client.predict("m", {"x": np.ones((1, 1), np.float32)})["y"].shape == (1, 1)
    assert holder[0].attempts == [None, "1", "2"]


def test_client_retries_can_be_turned_off(flaky_service: tuple[str, list[_Flaky]]) -> None:
    address, holder = flaky_service
    holder.append(_Flaky(1, grpc.StatusCode.UNAVAILABLE))
    with Client(address, options=NO_RETRIES) as client, pytest.raises(UnavailableError, match="attempt 1"):
        client.predict("m", {"x": np.ones((1, 1), np.float32)})
    assert holder[0].attempts == [None]


def test_client_does_not_retry_resource_exhausted(flaky_service: tuple[str, list[_Flaky]]) -> None:
    address, holder = flaky_service
    holder.append(_Flaky(1, grpc.StatusCode.RESOURCE_EXHAUSTED))
    with Client(address) as client, pytest.raises(ResourceExhaustedError):
        client.predict("m", {"x": np.ones((1, 1), np.float32)})
    assert holder[0].attempts == [None]


def test_retry_service_config_names_our_services_and_only_unavailable() -> None:
    assert json.loads(RETRY_SERVICE_CONFIG_JSON) == RETRY_SERVICE_CONFIG
    [method] = RETRY_SERVICE_CONFIG["methodConfig"]
    services = {name["service"] for name in method["name"]}
    assert services == {
        "tensorgate.v1.Predict",
        "tensorgate.v1.Stream",
        "tensorgate.v1.Models",
        "inference.GRPCInferenceService",
    }
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= method["retryPolicy"]["maxAttempts"] <= 5  # gRPC caps attempts at 5
