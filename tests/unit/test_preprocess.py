"""Image frames to input tensors: how the plan is resolved (stream, then config parameters, then the input's
shape and dtype) and what applying it does to JPEG, PNG and raw images."""

from __future__ import annotations

import io
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from tensorgate.engines import TensorSpec
from tensorgate.server.errors import InvalidInputError
from tensorgate.server.streams import (
    Color,
    EncodedImage,
    ImageFormat,
    ImagePlan,
    Layout,
    PreprocessSettings,
    resolve_plan,
)

F32 = np.dtype(np.float32)
U8 = np.dtype(np.uint8)


def spec(*shape: int, dtype: npt.DTypeLike = np.float32, name: str = "image") -> TensorSpec:
    return TensorSpec(name, np.dtype(dtype), shape)


def plan(
    *shape: int,
    dtype: npt.DTypeLike = np.float32,
    parameters: dict[str, str] | None = None,
    batched: bool = True,
    **settings: Any,
) -> ImagePlan:
    return resolve_plan(
        PreprocessSettings(**settings), parameters or {}, [spec(*shape, dtype=dtype)], batched=batched, model="m"
    )


def encoded(pixels: npt.NDArray[np.uint8], kind: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind, **options)
    return buffer.getvalue()


def rgb_pixels(height: int = 6, width: int = 10) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- resolving -------------------------------------------------------------------------------------------------


def test_nchw_rgb_float_from_the_input_shape() -> None:
    resolved = plan(-1, 3, 224, 160)
    assert (resolved.input, resolved.color, resolved.layout) == ("image", Color.RGB, Layout.NCHW)
    assert (resolved.width, resolved.height, resolved.dtype, resolved.batched) == (160, 224, F32, True)
    assert resolved.scale == 1.0
    assert not resolved.mean.any()
    assert np.all(resolved.std == 1)


def test_nhwc_uint8_and_grayscale_shapes() -> None:
    assert plan(-1, 32, 48, 3, dtype=np.uint8).layout is Layout.NHWC
    assert plan(-1, 32, 48, 3, dtype=np.uint8).dtype == U8
    gray = plan(-1, 1, 8, 8)
    assert (gray.color, gray.layout, gray.channel_dim) == (Color.GRAY, Layout.NCHW, True)
    flat = plan(-1, 8, 8)
    assert (flat.color, flat.channel_dim, flat.width, flat.height) == (Color.GRAY, False, 8, 8)
    unbatched = plan(3, 16, 16, batched=False)
    assert not unbatched.batched
    assert unbatched.layout is Layout.NCHW


def test_a_variable_size_takes_the_image_size_unless_told() -> None:
    assert (plan(-1, 3, -1, -1).width, plan(-1, 3, -1, -1).height) == (None, None)
    assert (plan(-1, 3, -1, -1, width=64, height=32).width, plan(-1, 3, -1, -1, height=32).height) == (64, 32)


def test_config_parameters_fill_what_the_stream_leaves_unset() -> None:
    parameters = {
        "image_color": "bgr",
        "image_scale": "0.5",
        "image_mean": "1, 2, 3",
        "image_std": "4",
        "image_layout": "NCHW",
    }
    resolved = plan(-1, 3, 4, 4, parameters=parameters)
    assert resolved.color is Color.BGR
    assert resolved.scale == 0.5
    np.testing.assert_array_equal(resolved.mean, [1, 2, 3])
    np.testing.assert_array_equal(resolved.std, [4, 4, 4])

    overridden = plan(-1, 3, 4, 4, parameters=parameters, color=Color.RGB, scale=2.0, std=(1.0, 2.0, 3.0))
    assert overridden.color is Color.RGB
    assert overridden.scale == 2.0
    np.testing.assert_array_equal(overridden.std, [1, 2, 3])
    np.testing.assert_array_equal(overridden.mean, [1, 2, 3])  # still from the config


def test_the_image_input_is_named_when_the_model_has_several() -> None:
    inputs = [spec(-1, 3, 8, 8, name="pixels"), spec(-1, 4, name="extra")]
    with pytest.raises(InvalidInputError, match="several inputs"):
        resolve_plan(PreprocessSettings(), {}, inputs, batched=True, model="m")
    assert resolve_plan(PreprocessSettings(input="pixels"), {}, inputs, batched=True, model="m").input == "pixels"
    assert resolve_plan(PreprocessSettings(), {"image_input": "pixels"}, inputs, batched=True, model="m").input == (
        "pixels"
    )
    with pytest.raises(InvalidInputError, match="no input 'nope'"):
        resolve_plan(PreprocessSettings(input="nope"), {}, inputs, batched=True, model="m")


@pytest.mark.parametrize(
    ("shape", "settings", "parameters", "message"),
    [
        ((-1, 4), {}, {}, "an image input has"),
        ((-1, 5, 8, 7), {}, {}, "no channel dimension"),
        ((-1, 3, 8, 8), {"color": Color.GRAY}, {}, "3 channel"),
        ((-1, 1, 8, 8), {"width": 9}, {}, "width 8, not 9"),
        ((-1, 3, 8, 8), {"mean": (1.0, 2.0)}, {}, "mean has 2 values"),
        ((-1, 3, 8, 8), {"std": (0.0,)}, {}, "zero"),
        ((-1, 3, 8, 8), {}, {"image_color": "purple"}, "parameter image_color 'purple'"),
        ((-1, 3, 8, 8), {}, {"image_mean": "1,x"}, "parameter image_mean"),
        ((-1, 3, 8, 8), {}, {"image_width": "-3"}, "parameter image_width"),
        ((-1, 3, 8, 8), {}, {"image_dtype": "FP99"}, "parameter image_dtype"),
        ((-1, 3, 8, 8), {"dtype": np.dtype(object)}, {}, "cannot become BYTES"),
    ],
)
def test_what_cannot_work_is_refused_with_a_reason(
    shape: tuple[int, ...], settings: dict[str, Any], parameters: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        plan(*shape, parameters=parameters, **settings)


# -- applying --------------------------------------------------------------------------------------------------


def test_png_grayscale_normalised_exactly() -> None:
    # The digits "video": pixel values 0..16 stored as v * 15, divided back by std 15 (an exact division).
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) % 17
    image = EncodedImage(ImageFormat.PNG, encoded(values * 15, "PNG"))

    tensor = plan(-1, 1, 8, 8, std=(15.0,)).apply(image)

    assert tensor.shape == (1, 1, 8, 8)
    assert tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor[0, 0], values.astype(np.float32))


def test_jpeg_is_decoded_by_signature_and_resized() -> None:
    pixels = np.full((48, 64, 3), (200, 100, 50), np.uint8)
    image = EncodedImage(ImageFormat.AUTO, encoded(pixels, "JPEG", quality=95))

    tensor = plan(-1, 3, 12, 16).apply(image)

    assert tensor.shape == (1, 3, 12, 16)
    np.testing.assert_allclose(tensor[0].mean(axis=(1, 2)), [200, 100, 50], atol=3)


def test_raw_rgb_bgr_and_gray_become_the_models_colours() -> None:
    pixels = rgb_pixels()
    height, width = pixels.shape[:2]
    rgb = EncodedImage(ImageFormat.RGB, pixels.tobytes(), width, height)
    bgr = EncodedImage(ImageFormat.BGR, pixels[..., ::-1].tobytes(), width, height)

    for image in (rgb, bgr):
        np.testing.assert_array_equal(plan(-1, height, width, 3, dtype=np.uint8).apply(image)[0], pixels)
        np.testing.assert_array_equal(
            plan(-1, height, width, 3, dtype=np.uint8, color=Color.BGR).apply(image)[0], pixels[..., ::-1]
        )
        as_nchw = plan(-1, 3, height, width).apply(image)[0]
        np.testing.assert_array_equal(as_nchw, pixels.transpose(2, 0, 1).astype(np.float32))
    gray = plan(-1, height, width, 1, dtype=np.uint8).apply(rgb)[0, ..., 0]
    np.testing.assert_array_equal(gray, np.asarray(Image.fromarray(pixels).convert("L")))
    levels = EncodedImage(ImageFormat.GRAY, bytes(range(6)), 3, 2)
    np.testing.assert_array_equal(plan(-1, 3, 2, 3, dtype=np.uint8).apply(levels)[0, 1], [[0, 1, 2], [3, 4, 5]])


def test_normalisation_per_channel_then_the_dtype() -> None:
    pixels = np.zeros((2, 2, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    image = EncodedImage(ImageFormat.RGB, pixels.tobytes(), 2, 2)

    normalised = plan(-1, 3, 2, 2, scale=2.0, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0)).apply(image)
    np.testing.assert_allclose(normalised[0, :, 0, 0], [5, 5, 6])

    clipped = plan(-1, 3, 2, 2, dtype=np.int8, scale=10.0).apply(image)
    assert clipped.dtype == np.int8
    np.testing.assert_array_equal(clipped[0, :, 0, 0], [100, 127, 127])
    assert plan(-1, 3, 2, 2, dtype=np.float16).apply(image).dtype == np.float16
    assert plan(-1, 3, 2, 2, dtype=ml_dtypes.bfloat16).apply(image).dtype == ml_dtypes.bfloat16
    assert plan(-1, 3, 2, 2, dtype=np.float64, std=(3.0,)).apply(image)[0, 0, 0, 0] == pytest.approx(10 / 3)


def test_a_variable_size_input_takes_the_image_as_it_is() -> None:
    pixels = rgb_pixels(5, 7)
    image = EncodedImage(ImageFormat.PNG, encoded(pixels, "PNG"))
    assert plan(-1, -1, -1, 3, dtype=np.uint8).apply(image).shape == (1, 5, 7, 3)
    assert plan(-1, 3, -1, -1, batched=True, width=14, height=10).apply(image).shape == (1, 3, 10, 14)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (EncodedImage(ImageFormat.AUTO, b"not an image at all"), "neither JPEG nor PNG"),
        (EncodedImage(ImageFormat.JPEG, encoded(rgb_pixels(), "PNG")), "should be JPEG but is PNG"),
        (EncodedImage(ImageFormat.PNG, encoded(rgb_pixels(), "PNG")[:60]), "PNG image cannot be decoded"),
        (EncodedImage(ImageFormat.JPEG, encoded(rgb_pixels(64, 64), "JPEG")[:200]), "JPEG image cannot be decoded"),
        (EncodedImage(ImageFormat.RGB, b"\x00" * 10, 2, 2), "has 10 bytes; 2x2 needs 12"),
        (EncodedImage(ImageFormat.GRAY, b"\x00" * 4), "needs its width and height"),
        (EncodedImage(ImageFormat.GRAY, b"", 100_000, 100_000), "over 40000000 pixels"),
    ],
)
def test_bad_images_are_invalid_input(image: EncodedImage, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        plan(-1, 3, 8, 8).apply(image)
