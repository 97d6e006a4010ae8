"""Version routing for real: a weighted canary split (seen in responses and in the per-version metrics), pins by
header and by request parameter, deterministic routing keys, versions that are not ready, and config errors.

Every version computes y = x + its version number, so each response is attributed by its outputs too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.oip import grpc_service_pb2 as pb
from tensorgate.oip import grpc_service_pb2_grpc as pb_grpc
from tensorgate.server.repository.routing import DEFAULT_KEY_HEADER, DEFAULT_PIN_HEADER
from tensorgate.v1 import (
    model_config_pb2,
    models_pb2,
    models_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    stream_pb2,
    stream_pb2_grpc,
)
from tests.integration.test_reload import serving_model
from tests.support.serving import ServerThread
from tests.support.telemetry import scrape, telemetry_server, wait_for

PREDICT = "tensorgate.v1.Predict/Predict"
BLOCK = stream_pb2.DROP_POLICY_BLOCK  # every frame is answered
CANARY = """
version_policy { all { } }
routing {
  weights { key: 1 value: 70 }
  weights { key: 2 value: 30 }
}
"""
#: Version 2 of this one does not load: its weight must go to version 1.
HALF_BROKEN = """
version_policy { all { } }
routing { weights { key: 1 value: 50 } weights { key: 2 value: 50 } }
"""
#: Weights naming a version that is not served: a config error, with the file and line.
BAD_WEIGHTS = """
routing {
  weights { key: 1 value: 1 }
  weights { key: 7 value: 1 }
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repository = tmp_path_factory.mktemp("routing")
    serving_model(repository, "canary", (1, 2), CANARY)
    serving_model(repository, "latest", (1, 2), "version_policy { all { } }")  # no routing config
    broken = serving_model(repository, "half_broken", (1,), HALF_BROKEN)
    (broken / "2").mkdir()
    (broken / "2" / "model.onnx").write_bytes(b"not a model")
    serving_model(repository, "bad_weights", (1,), BAD_WEIGHTS)
    with telemetry_server(repository, metrics_address="127.0.0.1:0") as (thread, _):
        yield thread


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as chan:
        yield chan


def _predict(channel: grpc.Channel, model: str, metadata: tuple[tuple[str, str], ...] = (), version: int = 0) -> int:
    x = np.array([[1.0, 2.0]], np.float32)
    request = predict_pb2.PredictRequest(model=model, version=version, inputs=[to_tensor("x", x)])
    reply = predict_pb2_grpc.PredictStub(channel).Predict(request, timeout=30, metadata=metadata)
    assert np.array_equal(from_tensor(reply.outputs[0]), x + reply.version), "the outputs are another version's"
    return int(reply.version)


def _infer(
    channel: grpc.Channel, model: str, metadata: tuple[tuple[str, str], ...] = (), **parameters: Any
) -> tuple[int, str]:
    request = pb.ModelInferRequest(model_name=model, model_version=parameters.pop("model_version", ""))
    for key, value in parameters.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    x = np.array([[3.0, 4.0]], np.float32)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(x.tobytes())
    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30, metadata=metadata)
    y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 2)
    assert np.array_equal(y, x + int(reply.model_version)), "the outputs are another version's"
    return int(reply.model_version), reply.model_name


def _failure(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    return error.code(), error.details()


def _requests_ok(samples: dict[Any, float], model: str) -> dict[str, float]:
    return {
        labels["version"]: value
        for (name, label_items), value in samples.items()
        if name == "tensorgate_requests_total"
        and (labels := dict(label_items))["model"] == model
        and labels["rpc"] == PREDICT
        and labels["code"] == "OK"
    }


def test_the_canary_split_follows_the_weights_and_the_metrics_show_it(
    server: ServerThread, channel: grpc.Channel
) -> None:
    requests = 200
    seen = Counter(_predict(channel, "canary") for _ in range(requests))
    assert set(seen) == {1, 2}
    assert seen[1] > seen[2] >= requests * 0.1  # 70/30 expected; loose on purpose
    address = server.server.telemetry.metrics_address
    # The interceptor records a call just after its status went out: wait for the last one.
    counted = wait_for(
        lambda: (c := _requests_ok(scrape(address), "canary")) and sum(c.values()) >= requests and c,
        what="every canary call counted",
    )
    assert counted == {"1": float(seen[1]), "2": float(seen[2])}


def test_a_routing_key_keeps_a_client_on_one_version(channel: grpc.Channel) -> None:
    per_client = {
        client: {_predict(channel, "canary", ((DEFAULT_KEY_HEADER, client),)) for _ in range(3)}
        for client in (f"client-{i}" for i in range(30))
    }
    assert all(len(versions) == 1 for versions in per_client.values()), per_client
    assert set().union(*per_client.values()) == {1, 2}  # different keys still spread over both
    # The OIP API routes the same key to the same version.
    for client, versions in list(per_client.items())[:10]:
        assert _infer(channel, "canary", ((DEFAULT_KEY_HEADER, client),))[0] in versions


def test_pins_by_header_and_by_request_parameter(channel: grpc.Channel) -> None:
    pin_two = ((DEFAULT_PIN_HEADER, "2"),)
    assert {_predict(channel, "canary", pin_two) for _ in range(20)} == {2}
    assert {_infer(channel, "canary", pin_two)[0] for _ in range(10)} == {2}
    assert {_predict(channel, "latest", ((DEFAULT_PIN_HEADER, "1"),)) for _ in range(5)} == {1}  # any model
    assert {_infer(channel, "canary", version=1)[0] for _ in range(10)} == {1}
    assert {_infer(channel, "canary", version="2")[0] for _ in range(10)} == {2}
    # The request's own version wins over the header.
    assert _predict(channel, "canary", pin_two, version=1) == 1
    # Without pins or weights: the highest version.
    assert {_predict(channel, "latest") for _ in range(5)} == {2}


def test_pins_to_missing_versions_are_not_found_and_bad_pins_invalid(channel: grpc.Channel) -> None:
    code, details = _failure(lambda: _predict(channel, "canary", ((DEFAULT_PIN_HEADER, "9"),)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "version 9" in details
    code, details = _failure(lambda: _infer(channel, "canary", version=9))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = _failure(lambda: _predict(channel, "canary", ((DEFAULT_PIN_HEADER, "newest"),)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert DEFAULT_PIN_HEADER in details
    code, details = _failure(lambda: _infer(channel, "canary", model_version="1", version=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "disagree" in details
    code, details = _failure(lambda: _infer(channel, "canary", version=0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _predict(channel, "canary") in (1, 2)  # and the server keeps serving


def test_versions_that_are_not_ready_get_no_share(channel: grpc.Channel) -> None:
    assert {_predict(channel, "half_broken") for _ in range(30)} == {1}
    listed = _statuses(channel)["half_broken"]
    assert [(v.version, v.state) for v in listed.versions] == [
        (1, models_pb2.VERSION_STATE_READY),
        (2, models_pb2.VERSION_STATE_FAILED),
    ]
    code, _ = _failure(lambda: _predict(channel, "half_broken", ((DEFAULT_PIN_HEADER, "2"),)))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_weights_naming_an_unserved_version_are_a_config_error_with_file_and_line(
    server: ServerThread, channel: grpc.Channel
) -> None:
    status = _statuses(channel)["bad_weights"]
    assert not status.versions
    config_file = Path(server.settings.repository) / "bad_weights" / "config.pbtxt"
    line = next(n for n, text in enumerate(config_file.read_text().splitlines(), 1) if "key: 7" in text)
    assert f"{config_file}:{line}: routing weights name version 7, which is not served" in status.reason
    code, details = _failure(lambda: _predict(channel, "bad_weights"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "version 7" in details


def _statuses(channel: grpc.Channel) -> dict[str, models_pb2.ModelStatus]:
    reply = models_pb2_grpc.ModelsStub(channel).List(models_pb2.ListModelsRequest(), timeout=10)
    return {status.name: status for status in reply.models}


def test_the_oip_model_config_leaves_our_routing_extension_out(channel: grpc.Channel) -> None:
    # Triton's ModelConfig has no `routing`: OIP clients must not get it as an unknown field.
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    config = stub.ModelConfig(pb.ModelConfigRequest(name="canary"), timeout=10).config
    assert config.name == "canary"
    # Read back as our own message, nothing of `routing` came over the wire.
    assert not model_config_pb2.ModelConfig.FromString(config.SerializeToString()).HasField("routing")


def test_streams_honour_the_pin_header_for_every_frame(channel: grpc.Channel) -> None:
    pin_two = ((DEFAULT_PIN_HEADER, "2"),)
    x = np.array([[1.0, 2.0]], np.float32)
    requests = [stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model="canary", drop_policy=BLOCK))]
    requests += [
        stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=i, inputs=[to_tensor("x", x)])) for i in range(6)
    ]
    replies = list(stream_pb2_grpc.StreamStub(channel).Stream(iter(requests), timeout=30, metadata=pin_two))
    assert [reply.version for reply in replies] == [2] * 6

    oip_requests = []
    for _ in range(6):
        request = pb.ModelInferRequest(model_name="canary")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        request.raw_input_contents.append(x.tobytes())
        oip_requests.append(request)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    answers = list(stub.ModelStreamInfer(iter(oip_requests), timeout=30, metadata=pin_two))
    assert [answer.error_message for answer in answers] == [""] * 6
    assert [answer.infer_response.model_version for answer in answers] == ["2"] * 6
