"""A digits "video": the held-out digits rendered as 8x8 grayscale PNG frames, streamed through the bundled
classifier with server-side decoding and preprocessing, scores exactly what the model scores in-process."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image as PILImage

from examples.build_digits import held_out_digits
from tensorgate.client import AsyncClient, Frame, Image, Preprocessing, StreamResult
from tests.support.serving import EXAMPLE_MODELS, ServerThread

#: Pixel values 0..16 are stored as v * 15 (0..240) and divided back by the server: an exact round trip.
LEVEL = 15


def render(image: npt.NDArray[np.float32]) -> bytes:
    """One digit ([1, 8, 8] floats 0..16) as a grayscale PNG."""
    pixels = (image[0] * LEVEL).round().astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def _stream(address: str, video: list[bytes]) -> list[StreamResult]:
    async def frames() -> AsyncIterator[Frame]:
        for index, png in enumerate(video):
            yield Frame(image=Image(png, "png"), capture_time_ns=1_000 + index)

    async with AsyncClient(address) as client:
        stream = client.stream(
            "digits",
            frames(),
            outputs=["label"],
            policy="block",  # a recording: every frame gets its answer
            preprocessing=Preprocessing(std=[LEVEL], dtype="FP32", layout="NCHW", color="GRAY"),
        )
        return [result async for result in stream]


def test_a_digits_video_scores_what_the_model_scores_in_process(served: ServerThread) -> None:
    images, labels = held_out_digits()
    session = ort.InferenceSession(str(EXAMPLE_MODELS / "digits" / "1" / "model.onnx"))
    in_process = session.run(["label"], {"image": images})[0]
    video = [render(image) for image in images]

    results = asyncio.run(_stream(served.address, video))

    assert [result.sequence for result in results] == list(range(len(images)))
    assert all(result.ok for result in results)
    assert [result.capture_time_ns for result in results] == [1_000 + i for i in range(len(images))]
    streamed = np.array([int(result.outputs["label"][0]) for result in results])
    np.testing.assert_array_equal(streamed, in_process)
    accuracy = float(np.mean(streamed == labels))
    assert accuracy == float(np.mean(in_process == labels))
    assert accuracy >= 0.9
