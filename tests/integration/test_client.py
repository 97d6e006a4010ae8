"""`Client` and `AsyncClient` against the real server serving examples/models (digits, add_sub)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tensorgate.client import AsyncClient, Client, ModelInfo, StreamResult, TensorInfo, VersionInfo
from tensorgate.client import errors as client_errors
from tests.support.serving import ServerThread

A = np.arange(8, dtype=np.float32).reshape(2, 4)
B = np.full((2, 4), 0.5, dtype=np.float32)


def add_sub_frame(i: int) -> dict[str, npt.NDArray[Any]]:
    return {"a": np.full((1, 4), i, np.float32), "b": np.ones((1, 4), np.float32)}


def images(n: int) -> npt.NDArray[np.float32]:
    return np.random.default_rng(0).uniform(0, 16, (n, 1, 8, 8)).astype(np.float32)


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def client(served: ServerThread) -> Iterator[Client]:
    with Client(served.address, timeout=30) as c:
        yield c


@pytest.fixture
async def aclient(served: ServerThread) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(served.address, timeout=30) as c:
        yield c


# Sync -------------------------------------------------------------------------------------------------------


def test_predict_add_sub(client: Client) -> None:
    outputs = client.predict("add_sub", {"a": A, "b": B})

    assert set(outputs) == {"sum", "difference"}
    np.testing.assert_allclose(outputs["sum"], A + B)
    np.testing.assert_allclose(outputs["difference"], A - B)
    assert outputs["sum"].dtype == np.float32


def test_predict_digits_with_version_outputs_and_priority(client: Client) -> None:
    everything = client.predict("digits", {"image": images(3)}, version=1, request_id="client-test")
    only_label = client.predict("digits", {"image": images(3)}, outputs=["label"], priority=1, timeout=10)

    assert everything["probabilities"].shape == (3, 10)
    np.testing.assert_allclose(everything["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert everything["label"].dtype == np.int64
    assert list(only_label) == ["label"]
    np.testing.assert_array_equal(only_label["label"], everything["label"])


def test_unknown_model_is_not_found(client: Client) -> None:
    with pytest.raises(client_errors.NotFoundError) as caught:
        client.predict("no_such_model", {"x": np.zeros(1, np.float32)})

    assert "no_such_model" in caught.value.details
    assert caught.value.code.name == "NOT_FOUND"


def test_unknown_version_is_not_found(client: Client) -> None:
    with pytest.raises(client_errors.NotFoundError):
        client.predict("add_sub", {"a": A, "b": B}, version=99)


def test_wrong_dtype_is_invalid_argument(client: Client) -> None:
    with pytest.raises(client_errors.InvalidArgumentError) as caught:
        client.predict("add_sub", {"a": A.astype(np.float64), "b": B})

    assert "'a'" in caught.value.details or '"a"' in caught.value.details


def test_expired_deadline(client: Client) -> None:
    with pytest.raises(client_errors.DeadlineExceededError):
        client.predict("digits", {"image": images(1)}, timeout=1e-6)


def test_unreachable_server_is_unavailable() -> None:
    with (
        Client(closed_port_address(), timeout=10) as dead,
        pytest.raises(client_errors.UnavailableError) as caught,
    ):
        dead.health()

    assert caught.value.retryable


def test_stream_results_in_order(client: Client) -> None:
    results = list(client.stream("add_sub", (add_sub_frame(i) for i in range(20)), outputs=["sum"], policy="block"))

    assert [r.sequence for r in results] == list(range(20))
    assert all(r.ok and r.version == 1 and list(r.outputs) == ["sum"] for r in results)
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.outputs["sum"], np.full((1, 4), i + 1))


def test_stream_bad_frame_gets_an_error_and_the_stream_goes_on(client: Client) -> None:
    frames = [add_sub_frame(0), {"a": np.zeros((1, 3), np.float32), "b": np.zeros((1, 3), np.float32)}]
    frames.append(add_sub_frame(2))

    results = list(client.stream("add_sub", frames, policy="block"))

    assert [r.sequence for r in results] == [0, 1, 2]
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error is not None
    assert results[1].error.code == "INVALID_ARGUMENT"
    assert results[1].outputs == {}
    assert isinstance(results[1].error.to_exception(), client_errors.InvalidArgumentError)


def test_stream_unknown_model_raises(client: Client) -> None:
    with pytest.raises(client_errors.NotFoundError):
        list(client.stream("no_such_model", [add_sub_frame(0)]))


def test_stream_source_error_is_raised_after_earlier_results(client: Client) -> None:
    def frames() -> Iterator[dict[str, npt.NDArray[Any]]]:
        yield add_sub_frame(0)
        yield add_sub_frame(1)
        raise RuntimeError("camera unplugged")

    received: list[StreamResult] = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        received.extend(client.stream("add_sub", frames(), policy="block"))

    assert [r.sequence for r in received] == [0, 1]


def test_stream_stopped_early_is_cancelled(client: Client) -> None:
    def endless() -> Iterator[dict[str, npt.NDArray[Any]]]:
        i = 0
        while True:
            yield add_sub_frame(i)
            i += 1

    results = client.stream("add_sub", endless(), policy="block")
    first = [next(results) for _ in range(3)]
    results.close()  # what leaving a for loop early does

    assert [r.sequence for r in first] == [0, 1, 2]
    assert client.ready("add_sub")  # the client goes on working


def test_models(client: Client) -> None:
    models = {m.name: m for m in client.models()}

    assert models["digits"] == ModelInfo("digits", "onnxruntime_onnx", [VersionInfo(1, "READY")])
    assert models["add_sub"].versions == [VersionInfo(1, "READY")]


def test_metadata(client: Client) -> None:
    meta = client.metadata("digits")

    assert (meta.name, meta.version, meta.platform, meta.max_batch_size) == (
        "digits",
        1,
        "onnxruntime_onnx",
        64,
    )
    assert meta.inputs == [TensorInfo("image", "FP32", (-1, 1, 8, 8))]
    assert meta.outputs == [
        TensorInfo("probabilities", "FP32", (-1, 10)),
        TensorInfo("label", "INT64", (-1,)),
    ]
    assert "onnxruntime" in meta.engine
    assert client.metadata("add_sub", version=1).input("a") == TensorInfo("a", "FP32", (-1, 4))


def test_metadata_of_unknown_model(client: Client) -> None:
    with pytest.raises(client_errors.NotFoundError):
        client.metadata("no_such_model")


def test_ready(client: Client) -> None:
    assert client.ready("digits")
    assert client.ready("digits", version=1)
    assert not client.ready("digits", version=99)
    with pytest.raises(client_errors.NotFoundError):
        client.ready("no_such_model")


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("digits") == "SERVING"
    with pytest.raises(client_errors.NotFoundError):
        client.health("no_such_service")


def test_small_message_limit_is_resource_exhausted(served: ServerThread) -> None:
    options = [("grpc.max_receive_message_length", 16)]
    with (
        Client(served.address, timeout=30, options=options) as tiny,
        pytest.raises(client_errors.ResourceExhaustedError),
    ):
        tiny.predict("digits", {"image": images(4)})


# Async ------------------------------------------------------------------------------------------------------


async def test_async_predict(aclient: AsyncClient) -> None:
    outputs = await aclient.predict("add_sub", {"a": A, "b": B}, version=1)

    np.testing.assert_allclose(outputs["sum"], A + B)
    np.testing.assert_allclose(outputs["difference"], A - B)


async def test_async_concurrent_predicts(aclient: AsyncClient) -> None:
    batch = images(16)

    results = await asyncio.gather(*(aclient.predict("digits", {"image": batch[i : i + 1]}) for i in range(16)))
    together = await aclient.predict("digits", {"image": batch})

    np.testing.assert_array_equal(np.concatenate([r["label"] for r in results]), together["label"])


async def test_async_errors(aclient: AsyncClient) -> None:
    with pytest.raises(client_errors.NotFoundError):
        await aclient.predict("no_such_model", {"x": np.zeros(1, np.float32)})
    with pytest.raises(client_errors.InvalidArgumentError):
        await aclient.predict("add_sub", {"a": A})
    with pytest.raises(client_errors.DeadlineExceededError):
        await aclient.predict("digits", {"image": images(1)}, timeout=1e-6)


async def test_async_stream_from_an_async_source(aclient: AsyncClient) -> None:
    async def frames() -> AsyncIterator[dict[str, npt.NDArray[Any]]]:
        for i in range(10):
            await asyncio.sleep(0)
            yield add_sub_frame(i)

    results = [r async for r in aclient.stream("add_sub", frames(), policy="block")]

    assert [r.sequence for r in results] == list(range(10))
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.outputs["sum"], np.full((1, 4), i + 1))
        np.testing.assert_allclose(result.outputs["difference"], np.full((1, 4), i - 1))


async def test_async_stream_from_a_plain_source_with_a_bad_frame(aclient: AsyncClient) -> None:
    frames = [add_sub_frame(0), {"a": np.zeros((1, 4), np.float32)}, add_sub_frame(2)]

    results = [r async for r in aclient.stream("add_sub", frames, outputs=["difference"], policy="block")]

    assert [(r.sequence, r.ok) for r in results] == [(0, True), (1, False), (2, True)]
    assert results[1].error is not None
    assert results[1].error.code == "INVALID_ARGUMENT"


async def test_async_stream_errors(aclient: AsyncClient) -> None:
    with pytest.raises(client_errors.NotFoundError):
        _ = [r async for r in aclient.stream("no_such_model", [add_sub_frame(0)])]

    async def failing() -> AsyncIterator[dict[str, npt.NDArray[Any]]]:
        yield add_sub_frame(0)
        raise RuntimeError("camera unplugged")

    received: list[StreamResult] = []

    async def consume() -> None:
        async for result in aclient.stream("add_sub", failing(), policy="block"):
            received.append(result)

    with pytest.raises(RuntimeError, match="camera unplugged"):
        await consume()
    assert [r.sequence for r in received] == [0]


async def test_async_stream_rejected_while_frames_are_sent_keeps_its_code(aclient: AsyncClient) -> None:
    # grpc.aio loses the server's status when a write is in flight as the server ends the call (grpc#36066);
    # with many frames queued that happens on most tries, and the client must still report NOT_FOUND.
    for _ in range(10):
        with pytest.raises(client_errors.NotFoundError):
            _ = [r async for r in aclient.stream("no_such_model", [add_sub_frame(i) for i in range(50)])]


async def test_async_stream_stopped_early(aclient: AsyncClient) -> None:
    async def endless() -> AsyncIterator[dict[str, npt.NDArray[Any]]]:
        i = 0
        while True:
            yield add_sub_frame(i)
            i += 1

    results = aclient.stream("add_sub", endless(), policy="block")
    first = [await anext(results) for _ in range(3)]
    await results.aclose()  # what leaving an async for loop early does

    assert [r.sequence for r in first] == [0, 1, 2]
    assert await aclient.ready("add_sub")


async def test_async_models_metadata_ready_health(aclient: AsyncClient) -> None:
    names = [m.name for m in await aclient.models()]
    meta = await aclient.metadata("add_sub")

    assert {"digits", "add_sub"} <= set(names)
    assert [i.name for i in meta.inputs] == ["a", "b"]
    assert [o.name for o in meta.outputs] == ["sum", "difference"]
    assert await aclient.ready("add_sub")
    assert not await aclient.ready("add_sub", version=99)
    assert await aclient.health() == "SERVING"
    assert await aclient.health("add_sub") == "SERVING"
    with pytest.raises(client_errors.NotFoundError):
        await aclient.health("no_such_service")
    with pytest.raises(client_errors.NotFoundError):
        await aclient.metadata("no_such_model")


async def test_async_unreachable_server() -> None:
    async with AsyncClient(closed_port_address(), timeout=10) as dead:
        with pytest.raises(client_errors.UnavailableError):
            await dead.models()
