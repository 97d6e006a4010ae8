"""The bundled classifier through the running server scores what it scores in-process."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort

from examples.build_digits import held_out_digits
from tensorgate.client.tensors import from_tensor, to_tensor
from tensorgate.v1 import predict_pb2, predict_pb2_grpc
from tests.support.serving import EXAMPLE_MODELS, ServerThread


async def _predict_all(address: str, images: np.ndarray) -> np.ndarray:
    """Send every image as its own concurrent request, so the server's batcher merges them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = predict_pb2_grpc.PredictStub(channel)

        async def one(image: np.ndarray) -> int:
            request = predict_pb2.PredictRequest(model="digits", inputs=[to_tensor("image", image[None])])
            reply = await stub.Predict(request, timeout=60)
            outputs = {t.name: from_tensor(t) for t in reply.outputs}
            return int(outputs["label"][0])

        return np.array(await asyncio.gather(*(one(image) for image in images)))


def test_held_out_accuracy_matches_in_process(served: ServerThread) -> None:
    images, labels = held_out_digits()
    session = ort.InferenceSession(str(EXAMPLE_MODELS / "digits" / "1" / "model.onnx"))
    in_process = session.run(["label"], {"image": images})[0]

    served_labels = asyncio.run(_predict_all(served.address, images))

    np.testing.assert_array_equal(served_labels, in_process)
    accuracy = float(np.mean(served_labels == labels))
    assert accuracy == float(np.mean(in_process == labels))
    assert accuracy >= 0.9


def test_multi_row_requests_get_their_own_rows(served: ServerThread) -> None:
    images, _ = held_out_digits()
    session = ort.InferenceSession(str(EXAMPLE_MODELS / "digits" / "1" / "model.onnx"))
    expected = session.run(["probabilities"], {"image": images[:30]})[0]

    async def run() -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = predict_pb2_grpc.PredictStub(channel)
            chunks = [images[0:7], images[7:8], images[8:20], images[20:30]]
            replies = await asyncio.gather(
                *(
                    stub.Predict(predict_pb2.PredictRequest(model="digits", inputs=[to_tensor("image", chunk)]))
                    for chunk in chunks
                )
            )
            return [from_tensor(next(t for t in r.outputs if t.name == "probabilities")) for r in replies]

    np.testing.assert_allclose(np.concatenate(asyncio.run(run())), expected, rtol=1e-5, atol=1e-6)
