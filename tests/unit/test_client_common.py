"""What the two clients share: request building, response parsing, channel settings, the health codec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client import AsyncClient, Client, _common, _health
from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import models_pb2, stream_pb2, tensor_pb2

# Requests ---------------------------------------------------------------------------------------------------


def test_predict_request_carries_everything() -> None:
    image = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)

    request = _common.build_predict_request(
        "digits", {"image": image}, version=3, outputs=["label"], priority=1, request_id="r-1"
    )

    assert request.model == "digits"
    assert request.version == 3
    assert list(request.outputs) == ["label"]
    assert request.priority == 1
    assert request.request_id == "r-1"
    assert [t.name for t in request.inputs] == ["image"]
    assert request.inputs[0].dtype == tensor_pb2.DATA_TYPE_FP32
    np.testing.assert_array_equal(from_tensor(request.inputs[0]), image)


def test_predict_request_defaults_let_the_server_choose() -> None:
    request = _common.build_predict_request("add_sub", {"a": [[1.0, 2.0]], "b": np.zeros((1, 2))})

    assert request.version == 0
    assert list(request.outputs) == []
    assert request.priority == 0
    assert request.request_id == ""
    # dtypes are kept, not converted: a Python float list is FP64, np.zeros is FP64
    assert [t.dtype for t in request.inputs] == [tensor_pb2.DATA_TYPE_FP64, tensor_pb2.DATA_TYPE_FP64]


@pytest.mark.parametrize("version", [0, -1, True, 1.5])
def test_bad_version_is_refused_locally(version: Any) -> None:
    with pytest.raises(ValueError, match="version must be a positive integer"):
        _common.build_predict_request("m", {}, version=version)


def test_negative_priority_is_refused() -> None:
    with pytest.raises(ValueError, match="priority"):
        _common.build_predict_request("m", {}, priority=-1)


def test_outputs_as_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match="list of names"):
        _common.build_predict_request("m", {}, outputs="label")


def test_inputs_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="mapping"):
        _common.build_predict_request("m", [np.zeros(1)])  # type: ignore[arg-type]


def test_stream_config_then_numbered_frames() -> None:
    config = _common.build_stream_config("digits", version=2, outputs=["label"])
    numberer = _common.FrameNumberer()

    frames = [numberer.request({"image": np.full((1, 1, 8, 8), i, np.float32)}) for i in range(3)]

    assert config.WhichOneof("kind") == "config"
    assert (config.config.model, config.config.version, list(config.config.outputs)) == (
        "digits",
        2,
        ["label"],
    )
    assert [f.WhichOneof("kind") for f in frames] == ["frame"] * 3
    assert [f.frame.sequence for f in frames] == [0, 1, 2]
    assert numberer.sent == 3
    assert float(from_tensor(frames[2].frame.inputs[0]).max()) == 2.0


def test_metadata_and_ready_requests() -> None:
    assert _common.build_metadata_request("digits").version == 0
    assert _common.build_ready_request("digits", version=4) == models_pb2.ModelReadyRequest(model="digits", version=4)


# Responses --------------------------------------------------------------------------------------------------


def test_parse_outputs() -> None:
    probabilities = np.eye(2, 10, dtype=np.float32)
    label = np.array([0, 1], dtype=np.int64)

    outputs = _common.parse_outputs([to_tensor("probabilities", probabilities), to_tensor("label", label)])

    assert list(outputs) == ["probabilities", "label"]
    np.testing.assert_array_equal(outputs["probabilities"], probabilities)
    assert outputs["label"].dtype == np.int64


def test_parse_stream_response_outputs() -> None:
    response = stream_pb2.StreamResponse(sequence=7, outputs=[to_tensor("sum", np.ones(4, np.float32))], version=1)

    result = _common.parse_stream_response(response)

    assert (result.sequence, result.version, result.ok, result.error) == (7, 1, True, None)
    np.testing.assert_array_equal(result.outputs["sum"], np.ones(4, np.float32))


def test_parse_stream_response_error() -> None:
    response = stream_pb2.StreamResponse(
        sequence=2, error=stream_pb2.FrameError(code=3, message="tensor 'a': bad shape"), version=1
    )

    result = _common.parse_stream_response(response)

    assert not result.ok
    assert result.outputs == {}
    assert result.error == _common.FrameError("INVALID_ARGUMENT", "tensor 'a': bad shape")


def test_parse_models() -> None:
    response = models_pb2.ListModelsResponse(
        models=[
            models_pb2.ModelStatus(
                name="digits",
                platform="onnxruntime_onnx",
                versions=[
                    models_pb2.VersionStatus(version=1, state=models_pb2.VERSION_STATE_READY),
                    models_pb2.VersionStatus(version=2, state=models_pb2.VERSION_STATE_FAILED, reason="bad"),
                    models_pb2.VersionStatus(version=3, state=9),  # type: ignore[arg-type]
                ],
            ),
            models_pb2.ModelStatus(name="broken", reason="config.pbtxt: unknown field 'foo'"),
        ]
    )

    models = _common.parse_models(response)

    assert models == [
        _common.ModelInfo(
            "digits",
            "onnxruntime_onnx",
            [
                _common.VersionInfo(1, "READY"),
                _common.VersionInfo(2, "FAILED", "bad"),
                _common.VersionInfo(3, "STATE_9"),
            ],
        ),
        _common.ModelInfo("broken", "", [], "config.pbtxt: unknown field 'foo'"),
    ]


def test_parse_metadata() -> None:
    response = models_pb2.ModelMetadataResponse(
        name="digits",
        version=1,
        platform="onnxruntime_onnx",
        inputs=[tensor_pb2.TensorSpec(name="image", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1, 8, 8])],
        outputs=[
            tensor_pb2.TensorSpec(name="probabilities", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 10]),
            tensor_pb2.TensorSpec(name="label", dtype=tensor_pb2.DATA_TYPE_INT64, shape=[-1]),
            tensor_pb2.TensorSpec(name="unset", shape=[1]),
        ],
        max_batch_size=64,
        engine="onnxruntime (CPUExecutionProvider)",
    )

    meta = _common.parse_metadata(response)

    assert meta.inputs == [_common.TensorInfo("image", "FP32", (-1, 1, 8, 8))]
    assert meta.input("image").shape == (-1, 1, 8, 8)
    assert [(t.name, t.dtype, t.shape) for t in meta.outputs] == [
        ("probabilities", "FP32", (-1, 10)),
        ("label", "INT64", (-1,)),
        ("unset", "UNSPECIFIED", (1,)),
    ]
    assert (meta.name, meta.version, meta.max_batch_size) == ("digits", 1, 64)
    assert meta.engine == "onnxruntime (CPUExecutionProvider)"
    with pytest.raises(KeyError):
        meta.input("nope")


# Channel ----------------------------------------------------------------------------------------------------


def settings(**kwargs: Any) -> _common.ChannelSettings:
    arguments: dict[str, Any] = {
        "tls": False,
        "root_certificates": None,
        "private_key": None,
        "certificate_chain": None,
        "options": (),
        "metadata": (),
    }
    arguments.update(kwargs)
    return _common.channel_settings("127.0.0.1:8001", **arguments)


def test_default_options_are_64_mib() -> None:
    options = dict(settings().options)

    assert options["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert options["grpc.max_send_message_length"] == 64 * 1024 * 1024


def test_options_override_the_defaults() -> None:
    options = settings(options=[("grpc.max_receive_message_length", 1024), ("grpc.enable_retries", 0)]).options

    assert ("grpc.max_receive_message_length", 1024) in options
    assert ("grpc.enable_retries", 0) in options
    assert len([key for key, _ in options if key == "grpc.max_receive_message_length"]) == 1


def test_plaintext_by_default() -> None:
    assert settings().credentials is None


def test_tls_and_certificates() -> None:
    assert isinstance(settings(tls=True).credentials, grpc.ChannelCredentials)
    # A CA alone turns TLS on.
    assert isinstance(settings(root_certificates=b"-----BEGIN CERTIFICATE-----").credentials, grpc.ChannelCredentials)


def test_certificate_paths_are_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")

    assert settings(root_certificates=str(ca)).credentials is not None
    with pytest.raises(FileNotFoundError):
        settings(root_certificates=tmp_path / "missing.pem")


def test_mutual_tls_needs_both_halves() -> None:
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        settings(private_key=b"key")


def test_empty_address_is_refused() -> None:
    with pytest.raises(ValueError, match="address"):
        _common.channel_settings(
            "",
            tls=False,
            root_certificates=None,
            private_key=None,
            certificate_chain=None,
            options=(),
            metadata=(),
        )


def aio_error(code: grpc.StatusCode, details: str, debug: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, debug)


def test_lost_stream_status_is_recognised() -> None:
    lost = aio_error(
        grpc.StatusCode.INTERNAL,
        "Internal error from Core",
        'Failed "execute_batch": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f02c3acdcb0>,)',
    )

    assert _common.is_lost_stream_status(lost)
    assert not _common.is_lost_stream_status(aio_error(grpc.StatusCode.INTERNAL, "engine failed", ""))
    assert not _common.is_lost_stream_status(aio_error(grpc.StatusCode.NOT_FOUND, "no model", ""))
    assert not _common.is_lost_stream_status(None)
    assert not _common.is_lost_stream_status(ValueError())


def test_resolve_timeout() -> None:
    assert _common.resolve_timeout(None, 5.0) == 5.0
    assert _common.resolve_timeout(1.0, 5.0) == 1.0
    assert _common.resolve_timeout(None, None) is None


def test_client_checks_arguments_before_calling() -> None:
    # Channels connect lazily, so no socket is opened here.
    with Client("127.0.0.1:1") as client, pytest.raises(ValueError, match="version"):
        client.predict("digits", {"image": np.zeros((1, 1, 8, 8), np.float32)}, version=0)


async def test_async_client_checks_arguments_before_calling() -> None:
    async with AsyncClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="priority"):
            await client.predict("digits", {}, priority=-1)


def test_both_clients_have_the_same_methods() -> None:
    import inspect

    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and not name.startswith("_")
        }

    sync_methods, async_methods = public(Client), public(AsyncClient)
    assert sync_methods.keys() == async_methods.keys()
    for name, signature in sync_methods.items():
        other = async_methods[name]
        assert list(signature.parameters) == list(other.parameters), name
        # stream differs in its types only: (Async)Iterable frames in, (Async)Iterator results out
        if name != "stream":
            assert signature == other, name


# Health codec -----------------------------------------------------------------------------------------------

health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")


@pytest.mark.parametrize("service", ["", "digits", "tensorgate.v1.Predict", "é" * 200])
def test_health_request_matches_the_generated_message(service: str) -> None:
    encoded = _health.encode_check_request(service)

    assert encoded == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health_pb2.HealthCheckRequest.FromString(encoded).service == service


@pytest.mark.parametrize("status", ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"])
def test_health_response_matches_the_generated_message(status: str) -> None:
    message = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.ServingStatus.Value(status))

    assert _health.decode_check_response(message.SerializeToString()) == status


def test_health_response_skips_unknown_fields() -> None:
    # field 2 varint, field 3 bytes, field 4 fixed64, field 5 fixed32, then status SERVING
    data = b"\x10\x96\x01" + b"\x1a\x03abc" + b"\x21" + bytes(8) + b"\x2d" + bytes(4) + b"\x08\x01"

    assert _health.decode_check_response(data) == "SERVING"


def test_health_response_unknown_status() -> None:
    assert _health.decode_check_response(b"\x08\x07") == "STATUS_7"


@pytest.mark.parametrize("data", [b"\x08", b"\x08\x80", b"\x1a\x05ab", b"\x0f"])
def test_health_response_malformed(data: bytes) -> None:
    with pytest.raises(ValueError, match="health response"):
        _health.decode_check_response(data)
