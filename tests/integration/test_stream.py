"""tensorgate.v1.Stream on the server side: order, per-frame errors, and a bad first message."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import stream_pb2, stream_pb2_grpc, tensor_pb2


def _config(model: str = "add_sub") -> stream_pb2.StreamRequest:
    return stream_pb2.StreamRequest(config=stream_pb2.StreamConfig(model=model, outputs=["sum"]))


def _frame(sequence: int, *, rows: int = 1) -> stream_pb2.StreamRequest:
    a = np.full((rows, 4), sequence, np.float32)
    tensors = [to_tensor("a", a), to_tensor("b", a)]
    return stream_pb2.StreamRequest(frame=stream_pb2.Frame(sequence=sequence, inputs=tensors))


def _run(channel: grpc.Channel, requests: Iterator[stream_pb2.StreamRequest]) -> list[stream_pb2.StreamResponse]:
    return list(stream_pb2_grpc.StreamStub(channel).Stream(requests, timeout=30))


def test_results_come_back_in_frame_order(channel: grpc.Channel) -> None:
    sequences = [5, 3, 9, *range(10, 60)]
    results = _run(channel, iter([_config(), *(_frame(s, rows=1 + s % 3) for s in sequences)]))
    assert [r.sequence for r in results] == sequences
    for result, sequence in zip(results, sequences, strict=True):
        (output,) = result.outputs
        assert output.name == "sum"
        np.testing.assert_array_equal(from_tensor(output), np.full((1 + sequence % 3, 4), 2 * sequence))


def test_bad_frame_gets_an_error_result_and_the_stream_goes_on(channel: grpc.Channel) -> None:
    bad = stream_pb2.StreamRequest(
        frame=stream_pb2.Frame(
            sequence=2,
            inputs=[tensor_pb2.Tensor(name="a", dtype=tensor_pb2.DATA_TYPE_FP32, shape=[1, 4], raw=b"x")],
        )
    )
    results = _run(channel, iter([_config(), _frame(1), bad, _config(), _frame(4)]))
    assert [r.sequence for r in results] == [1, 2, 0, 4]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "'a'" in results[1].error.message
    assert "only the first message" in results[2].error.message
    assert len(results[3].outputs) == 1
    assert not results[3].HasField("error")


def test_first_message_must_be_config(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _run(channel, iter([_frame(1)]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in (caught.value.details() or "")


def test_unknown_model_fails_the_stream(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _run(channel, iter([_config("nope"), _frame(1)]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_empty_stream_ends_cleanly(channel: grpc.Channel) -> None:
    assert _run(channel, iter([])) == []
    assert _run(channel, iter([_config()])) == []
