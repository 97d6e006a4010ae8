"""Image frames to model input tensors: decode, convert colours, resize, normalise, cast, lay out.

`resolve_plan` decides once per stream, from the stream's settings, then the model's config.pbtxt `parameters`
(`image_*`), then the input's shape and dtype, how images become that input; `ImagePlan.apply` does it to one
frame. `apply` is CPU work (Pillow releases the GIL while it decodes and resizes): run it on a worker thread,
never on the event loop.
"""

from __future__ import annotations

import enum
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import numpy.typing as npt
from PIL import Image

from tensorgate.client.tensors import TensorFormatError, dtype_from_name, dtype_name
from tensorgate.engines import TensorSpec
from tensorgate.server.errors import InvalidInputError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "Color",
    "EncodedImage",
    "ImageFormat",
    "ImagePlan",
    "Layout",
    "PreprocessSettings",
    "resolve_plan",
]

#: Larger images are refused before they are decoded (a 16-megapixel camera still fits).
MAX_IMAGE_PIXELS = 40_000_000


class ImageFormat(enum.Enum):
    """How a frame's image bytes are encoded."""

    AUTO = "auto"  # JPEG or PNG, by signature
    JPEG = "JPEG"
    PNG = "PNG"
    RGB = "RGB"
    BGR = "BGR"
    GRAY = "GRAY"

    @property
    def raw(self) -> bool:
        """Whether the bytes are bare pixels (then the width and height must be given)."""
        return self in (ImageFormat.RGB, ImageFormat.BGR, ImageFormat.GRAY)


class Color(enum.Enum):
    """The channels a model's image input takes, in order."""

    RGB = "RGB"
    BGR = "BGR"
    GRAY = "GRAY"

    @property
    def channels(self) -> int:
        """1 for GRAY, else 3."""
        return 1 if self is Color.GRAY else 3


class Layout(enum.Enum):
    """Where the channel dimension of an image input is (after the batch dimension, if any)."""

    NCHW = "NCHW"
    NHWC = "NHWC"


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """One frame's image as it came: encoded (JPEG, PNG) or raw pixels of `width` x `height`."""

    format: ImageFormat
    data: bytes
    width: int = 0
    height: int = 0


@dataclass(frozen=True, slots=True)
class PreprocessSettings:
    """Preprocessing a stream asked for; None (or empty) leaves a setting to the model's config or shape."""

    input: str | None = None
    color: Color | None = None
    width: int | None = None
    height: int | None = None
    layout: Layout | None = None
    dtype: np.dtype[Any] | None = None
    scale: float | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


# -- resolving --------------------------------------------------------------------------------------------------

PARAMETER_PREFIX = "image_"
_PARAMETERS = ("input", "color", "width", "height", "layout", "dtype", "scale", "mean", "std")


def _parse_enum(kind: type[enum.Enum], value: str, what: str) -> Any:
    try:
        return kind(value.strip().upper())
    except ValueError:
        choices = ", ".join(str(member.value) for member in kind)
        raise InvalidInputError(f"{what} {value!r} is not one of {choices}") from None


def _parse_numbers(value: str, what: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(part) for part in value.replace(" ", "").split(",") if part)
    except ValueError:
        raise InvalidInputError(f"{what} {value!r} is not a comma-separated list of numbers") from None
    if not numbers or not all(math.isfinite(number) for number in numbers):
        raise InvalidInputError(f"{what} {value!r} is not a comma-separated list of finite numbers")
    return numbers


def _parse_size(value: str, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise InvalidInputError(f"{what} {value!r} is not a positive integer")
    return number


def settings_from_parameters(parameters: Mapping[str, str], where: str) -> PreprocessSettings:
    """The `image_*` entries of a model's config.pbtxt `parameters`; InvalidInputError naming a bad one."""
    values: dict[str, Any] = {}
    for name in _PARAMETERS:
        raw = parameters.get(PARAMETER_PREFIX + name)
        if raw is None:
            continue
        what = f"{where} parameter {PARAMETER_PREFIX + name}"
        if name == "input":
            values[name] = raw.strip() or None
        elif name == "color":
            values[name] = _parse_enum(Color, raw, what)
        elif name == "layout":
            values[name] = _parse_enum(Layout, raw, what)
        elif name in ("width", "height"):
            values[name] = _parse_size(raw, what)
        elif name == "dtype":
            try:
                values[name] = dtype_from_name(raw.strip().upper())
            except TensorFormatError as exc:
                raise InvalidInputError(f"{what}: {exc}") from None
        elif name == "scale":
            values[name] = _parse_numbers(raw, what)[0]
        else:
            values[name] = _parse_numbers(raw, what)
    return PreprocessSettings(**values)


def _merge(first: PreprocessSettings, then: PreprocessSettings) -> PreprocessSettings:
    """`first`'s settings, with `then`'s wherever `first` leaves one unset."""
    return PreprocessSettings(
        input=first.input or then.input,
        color=first.color or then.color,
        width=first.width or then.width,
        height=first.height or then.height,
        layout=first.layout or then.layout,
        dtype=first.dtype if first.dtype is not None else then.dtype,
        scale=first.scale if first.scale is not None else then.scale,
        mean=first.mean or then.mean,
        std=first.std or then.std,
    )


def _channel_values(values: tuple[float, ...], channels: int, what: str, default: float) -> npt.NDArray[np.float64]:
    if not values:
        return np.full(channels, default)
    if len(values) not in (1, channels):
        raise InvalidInputError(f"{what} has {len(values)} values; the input has {channels} channel(s)")
    return np.broadcast_to(np.asarray(values, np.float64), (channels,)).copy()


def _pick_input(inputs: Sequence[TensorSpec], wanted: str | None, model: str) -> TensorSpec:
    if wanted:
        for spec in inputs:
            if spec.name == wanted:
                return spec
        names = ", ".join(spec.name for spec in inputs)
        raise InvalidInputError(f"model {model!r} has no input {wanted!r} for the image (its inputs: {names})")
    if len(inputs) != 1:
        names = ", ".join(spec.name for spec in inputs)
        raise InvalidInputError(
            f"model {model!r} has several inputs ({names}); say which one takes the image "
            f"(preprocessing.input, or the config parameter {PARAMETER_PREFIX}input)"
        )
    return inputs[0]


def _layout_of(dims: tuple[int, ...], wanted: Layout | None, name: str) -> Layout:
    if wanted is not None:
        return wanted
    # A channel dimension of 1 or 3 decides; then a variable one; first wins a tie (ONNX models are mostly NCHW).
    for candidates in ((1, 3), (-1,)):
        if dims[0] in candidates:
            return Layout.NCHW
        if dims[2] in candidates:
            return Layout.NHWC
    raise InvalidInputError(
        f"input {name!r} has dims {list(dims)} (after the batch dimension): no channel dimension of 1 or 3 first "
        "or last; set the layout"
    )


def resolve_plan(
    settings: PreprocessSettings,
    parameters: Mapping[str, str],
    inputs: Sequence[TensorSpec],
    *,
    batched: bool,
    model: str,
) -> ImagePlan:
    """How images become the model's input, or InvalidInputError saying what does not fit.

    `inputs` are the served input specs (the batch dimension first when `batched`); `settings` win over the
    config `parameters`, which win over what the input's shape and dtype say.
    """
    merged = _merge(settings, settings_from_parameters(parameters, f"model {model!r}: config"))
    spec = _pick_input(inputs, merged.input, model)
    dims = tuple(spec.shape[1:] if batched else spec.shape)
    if len(dims) == 3:
        layout = _layout_of(dims, merged.layout, spec.name)
        channels, height, width = (dims[0], dims[1], dims[2]) if layout is Layout.NCHW else (dims[2], dims[0], dims[1])
    elif len(dims) == 2:
        layout, channels, (height, width) = Layout.NCHW, 1, dims
    else:
        raise InvalidInputError(
            f"input {spec.name!r} of model {model!r} has shape {list(spec.shape)}: an image input has "
            "[channels,] height, width dimensions (in either order) after the batch dimension"
        )
    color = merged.color or (Color.GRAY if channels == 1 else Color.RGB)
    if channels not in (-1, color.channels):
        raise InvalidInputError(
            f"input {spec.name!r} of model {model!r} has {channels} channel(s); {color.value} images have "
            f"{color.channels}"
        )
    for label, given, fixed in (("width", merged.width, width), ("height", merged.height, height)):
        if given is not None and fixed != -1 and given != fixed:
            raise InvalidInputError(f"input {spec.name!r} of model {model!r} has {label} {fixed}, not {given}")
    dtype = merged.dtype if merged.dtype is not None else np.dtype(spec.dtype)
    if dtype.kind not in "uif" and dtype != np.dtype(ml_dtypes.bfloat16):
        raise InvalidInputError(f"images cannot become {dtype_name(dtype)} tensors (input {spec.name!r})")
    mean = _channel_values(merged.mean, color.channels, "mean", 0.0)
    std = _channel_values(merged.std, color.channels, "std", 1.0)
    if not np.all(std != 0):
        raise InvalidInputError("std has a zero value")
    return ImagePlan(
        input=spec.name,
        color=color,
        width=merged.width or (width if width > 0 else None),
        height=merged.height or (height if height > 0 else None),
        layout=layout,
        channel_dim=len(dims) == 3,
        dtype=dtype,
        scale=1.0 if merged.scale is None else merged.scale,
        mean=mean,
        std=std,
        batched=batched,
    )


# -- applying ---------------------------------------------------------------------------------------------------

_SIGNATURES = ((b"\xff\xd8\xff", ImageFormat.JPEG), (b"\x89PNG\r\n\x1a\n", ImageFormat.PNG))


@dataclass(frozen=True, slots=True)
class ImagePlan:
    """How one model input is made from images: the resolved form of the stream's and the model's settings."""

    input: str
    color: Color
    #: None: the image's own size (the model takes any).
    width: int | None
    height: int | None
    layout: Layout
    #: False for an input of [batch,] height, width (grayscale without a channel dimension).
    channel_dim: bool
    dtype: np.dtype[Any]
    scale: float
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    batched: bool
    # Derived once: apply() runs per frame, and small frames cost more in Python than in Pillow.
    _work: type[np.floating[Any]] = field(init=False, repr=False)
    _scale: np.floating[Any] | None = field(init=False, repr=False)
    _mean: npt.NDArray[Any] | None = field(init=False, repr=False)
    _std: npt.NDArray[Any] | None = field(init=False, repr=False)
    _limits: tuple[int, int] | None = field(init=False, repr=False)
    _mode: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        work = np.float64 if self.dtype == np.float64 else np.float32
        derived = {
            "_work": work,
            "_scale": None if self.scale == 1.0 else work(self.scale),
            # Per channel: HxWx3 pixels broadcast with 3 values, HxW (GRAY) with 1.
            "_mean": self.mean.astype(work) if self.mean.any() else None,
            "_std": None if np.all(self.std == 1.0) else self.std.astype(work),
            "_limits": (int(np.iinfo(self.dtype).min), int(np.iinfo(self.dtype).max))
            if self.dtype.kind in "ui"
            else None,
            "_mode": "L" if self.color is Color.GRAY else "RGB",
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def apply(self, image: EncodedImage) -> npt.NDArray[Any]:
        """The input tensor for one image; InvalidInputError when it cannot be decoded or has the wrong size."""
        pixels = self._pixels(image)
        if self.dtype == np.uint8 and self._scale is None and self._mean is None and self._std is None:
            values: npt.NDArray[Any] = pixels
        else:
            values = pixels.astype(self._work)
            if self._scale is not None:
                values *= self._scale
            if self._mean is not None:
                values -= self._mean
            if self._std is not None:
                values /= self._std
            if self._limits is not None:
                values = np.clip(np.rint(values), *self._limits)
            values = values.astype(self.dtype, copy=False)
        if self.channel_dim:
            if values.ndim == 2:
                values = values[None] if self.layout is Layout.NCHW else values[..., None]
            elif self.layout is Layout.NCHW:
                values = values.transpose(2, 0, 1)
        values = np.ascontiguousarray(values)
        return values[None] if self.batched else values

    def _pixels(self, image: EncodedImage) -> npt.NDArray[np.uint8]:
        """Height x width (GRAY) or height x width x 3 uint8 pixels in this plan's colour order and size."""
        picture = self._decode(image, self._mode)
        size = (self.width or picture.width, self.height or picture.height)
        if picture.size != size:
            picture = picture.resize(size, Image.Resampling.BILINEAR)
        pixels: npt.NDArray[np.uint8] = np.asarray(picture)
        return pixels[..., ::-1] if self.color is Color.BGR else pixels

    def _decode(self, image: EncodedImage, mode: str) -> Image.Image:
        if image.format.raw:
            return self._from_raw(image, mode)
        detected = next((fmt for signature, fmt in _SIGNATURES if image.data.startswith(signature)), None)
        if detected is None or image.format not in (ImageFormat.AUTO, detected):
            expected = "JPEG or PNG" if image.format is ImageFormat.AUTO else image.format.value
            found = f"{detected.value} data" if detected else "neither JPEG nor PNG data"
            raise InvalidInputError(f"the frame's image should be {expected} but is {found}")
        try:
            picture = Image.open(io.BytesIO(image.data), formats=[detected.value])
            if picture.width * picture.height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(
                    f"the frame's image is {picture.width}x{picture.height}, over {MAX_IMAGE_PIXELS} pixels"
                )
            if detected is ImageFormat.JPEG and self.width and self.height:
                # Decode at the smallest 1/2, 1/4 or 1/8 scale that is still at least the target size: the
                # DCT does the downscaling almost for free.
                picture.draft(mode, (self.width, self.height))
            picture.load()  # decode errors surface here, inside the try
            return picture if picture.mode == mode else picture.convert(mode)
        except InvalidInputError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib errors, ...
            raise InvalidInputError(f"the frame's {detected.value} image cannot be decoded: {exc}") from None

    def _from_raw(self, image: EncodedImage, mode: str) -> Image.Image:
        channels = 1 if image.format is ImageFormat.GRAY else 3
        width, height = image.width, image.height
        if width < 1 or height < 1:
            raise InvalidInputError(f"a raw {image.format.value} image needs its width and height")
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInputError(f"the frame's image is {width}x{height}, over {MAX_IMAGE_PIXELS} pixels")
        if len(image.data) != width * height * channels:
            raise InvalidInputError(
                f"the frame's raw {image.format.value} image has {len(image.data)} bytes; {width}x{height} "
                f"needs {width * height * channels}"
            )
        pixels = np.frombuffer(image.data, np.uint8)
        if channels == 1:
            picture = Image.fromarray(pixels.reshape(height, width))  # uint8 HxW: mode L
        else:
            pixels = pixels.reshape(height, width, 3)
            if image.format is ImageFormat.BGR:
                pixels = np.ascontiguousarray(pixels[..., ::-1])
            picture = Image.fromarray(pixels)  # uint8 HxWx3: mode RGB
        return picture if picture.mode == mode else picture.convert(mode)
