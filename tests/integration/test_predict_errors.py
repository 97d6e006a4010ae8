"""Bad input over the wire: each gets its own status code and a message naming what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tensorgate.client.tensors import to_tensor
from tensorgate.v1 import predict_pb2, predict_pb2_grpc, tensor_pb2
from tests.support.serving import copy_models, running_server


def _predict(channel: grpc.Channel, **fields: Any) -> predict_pb2.PredictResponse:
    return predict_pb2_grpc.PredictStub(channel).Predict(predict_pb2.PredictRequest(**fields), timeout=30)


class _Failure:
    def __init__(self, error: grpc.RpcError) -> None:
        self._code: grpc.StatusCode = error.code()
        self._details: str = error.details() or ""

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _error(channel: grpc.Channel, **fields: Any) -> _Failure:
    with pytest.raises(grpc.RpcError) as caught:
        _predict(channel, **fields)
    return _Failure(caught.value)


def _image(rows: int = 1, dtype: Any = np.float32) -> tensor_pb2.Tensor:
    return to_tensor("image", np.zeros((rows, 1, 8, 8), dtype=dtype))


def test_good_request_succeeds(channel: grpc.Channel) -> None:
    a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((2, 4), np.float32)
    reply = _predict(channel, model="add_sub", inputs=[to_tensor("a", a), to_tensor("b", b)], request_id="r-1")
    outputs = {t.name: np.frombuffer(t.raw, np.float32).reshape(t.shape) for t in reply.outputs}
    np.testing.assert_array_equal(outputs["sum"], a + b)
    np.testing.assert_array_equal(outputs["difference"], a - b)
    assert (reply.model, reply.version, reply.request_id) == ("add_sub", 1, "r-1")


def test_requested_outputs_only(channel: grpc.Channel) -> None:
    reply = _predict(channel, model="digits", inputs=[_image(2)], outputs=["label"])
    assert [t.name for t in reply.outputs] == ["label"]


def test_unknown_model_is_not_found(channel: grpc.Channel) -> None:
    error = _error(channel, model="no_such_model", inputs=[_image()])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in error.details()


def test_unknown_version_is_not_found(channel: grpc.Channel) -> None:
    error = _error(channel, model="digits", version=7, inputs=[_image()])
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7" in error.details()


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (_image(dtype=np.float64), "dtype FP64"),
        (to_tensor("image", np.zeros((1, 8, 8), np.float32)), "shape [1, 8, 8]"),
        (to_tensor("image", np.zeros((1, 1, 8, 9), np.float32)), "shape [1, 1, 8, 9]"),
        (
            tensor_pb2.Tensor(name="image", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[1, 1, 8, 8], raw=b"\0" * 255),
            "255 bytes",
        ),
        (
            tensor_pb2.Tensor(name="image", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[1, 1, 8, -8], raw=b""),
            "negative",
        ),
        (tensor_pb2.Tensor(name="image", shape=[1, 1, 8, 8], raw=b"\0" * 256), "dtype is not set"),
        (_image(rows=65), "65 rows"),
        (_image(rows=0), "0 rows"),
    ],
    ids=[
        "dtype",
        "rank",
        "shape",
        "byte-length",
        "negative-dim",
        "no-dtype",
        "batch-over-max",
        "empty-batch",
    ],
)
def test_bad_tensor_is_invalid_argument_naming_it(
    channel: grpc.Channel, tensor: tensor_pb2.Tensor, expected: str
) -> None:
    error = _error(channel, model="digits", inputs=[tensor])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'image'" in error.details()
    assert expected in error.details()


def test_missing_input_is_invalid_argument(channel: grpc.Channel) -> None:
    error = _error(channel, model="add_sub", inputs=[to_tensor("a", np.zeros((1, 4), np.float32))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing input 'b'" in error.details()


def test_extra_input_is_invalid_argument(channel: grpc.Channel) -> None:
    error = _error(channel, model="digits", inputs=[_image(), to_tensor("bonus", np.zeros((1,), np.float32))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown input 'bonus'" in error.details()


def test_duplicate_input_is_invalid_argument(channel: grpc.Channel) -> None:
    error = _error(channel, model="digits", inputs=[_image(), _image()])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'image' is given more than once" in error.details()


def test_mismatched_batch_rows_is_invalid_argument(channel: grpc.Channel) -> None:
    a, b = np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)
    error = _error(channel, model="add_sub", inputs=[to_tensor("a", a), to_tensor("b", b)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'b' has 3 rows" in error.details()


def test_unknown_output_is_invalid_argument(channel: grpc.Channel) -> None:
    error = _error(channel, model="digits", inputs=[_image()], outputs=["logits"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown output 'logits'" in error.details()


def test_message_over_the_limit_is_resource_exhausted(tmp_path: Path) -> None:
    with (
        running_server(copy_models(tmp_path, "digits"), max_message_bytes=64 * 1024) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        error = _error(channel, model="digits", inputs=[_image(rows=64)] * 2)  # 2 x 16 KiB fits
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # the limit is not what stops this one
        big = to_tensor("image", np.zeros((64 * 5, 1, 8, 8), np.float32))  # 80 KiB
        error = _error(channel, model="digits", inputs=[big])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server goes on serving after refusing it.
        assert len(_predict(channel, model="digits", inputs=[_image(rows=3)]).outputs) == 2
