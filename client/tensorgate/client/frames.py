"""What a stream sends: frames of tensors or images, the stream's drop policy and image preprocessing.

    from tensorgate.client import Client, Frame, Image, Preprocessing

    with Client("127.0.0.1:8001") as client:
        frames = (Image(jpeg_bytes) for jpeg_bytes in camera)           # or Image.from_array(pixels, "bgr")
        for result in client.stream("detector", frames, policy="latest"):
            print(result.sequence, result.latency, result.dropped, result.outputs)

Only numpy is needed here: images are sent as the bytes they are (JPEG, PNG, or raw pixels) and decoded on the
server.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tensorgate.client.tensors import dtype_from_name, dtype_name, to_tensor, to_wire_dtype
from tensorgate.v1 import stream_pb2

__all__ = [
    "DROP_POLICIES",
    "IMAGE_FORMATS",
    "Frame",
    "FrameTimings",
    "Image",
    "Preprocessing",
    "build_config",
    "build_frame",
]

Inputs = Mapping[str, npt.ArrayLike]

#: `policy` names: "latest" (the server's default), "queue" and "block"; see `Client.stream`.
DROP_POLICIES: dict[str, stream_pb2.DropPolicy.ValueType] = {
    "latest": stream_pb2.DROP_POLICY_LATEST,
    "queue": stream_pb2.DROP_POLICY_QUEUE,
    "block": stream_pb2.DROP_POLICY_BLOCK,
}
#: `Image.format` names.
IMAGE_FORMATS: dict[str, stream_pb2.ImageFormat.ValueType] = {
    "auto": stream_pb2.IMAGE_FORMAT_UNSPECIFIED,
    "jpeg": stream_pb2.IMAGE_FORMAT_JPEG,
    "png": stream_pb2.IMAGE_FORMAT_PNG,
    "rgb": stream_pb2.IMAGE_FORMAT_RGB,
    "bgr": stream_pb2.IMAGE_FORMAT_BGR,
    "gray": stream_pb2.IMAGE_FORMAT_GRAY,
}
_COLORS = {"RGB": stream_pb2.COLOR_ORDER_RGB, "BGR": stream_pb2.COLOR_ORDER_BGR, "GRAY": stream_pb2.COLOR_ORDER_GRAY}
_LAYOUTS = {"NCHW": stream_pb2.LAYOUT_NCHW, "NHWC": stream_pb2.LAYOUT_NHWC}


@dataclass(frozen=True)
class Image:
    """An image frame, preprocessed into the model's input on the server.

    Attributes:
        data: JPEG or PNG bytes, or raw 8-bit pixels, row-major, no padding.
        format: "auto" (JPEG or PNG, told apart by the data), "jpeg", "png", or raw "rgb", "bgr", "gray".
        width: raw formats only: pixels per row.
        height: raw formats only: rows.
    """

    data: bytes
    format: str = "auto"
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"image format {self.format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        if self.format in ("rgb", "bgr", "gray") and (self.width < 1 or self.height < 1):
            raise ValueError(f"a raw {self.format} image needs its width and height")

    @classmethod
    def from_array(cls, pixels: npt.ArrayLike, format: str = "rgb") -> Image:
        """Raw pixels: height x width x 3 uint8 ("rgb" or "bgr", OpenCV's order), or height x width ("gray")."""
        array = np.ascontiguousarray(pixels)
        if array.dtype != np.uint8:
            raise ValueError(f"image pixels must be uint8, not {array.dtype}")
        if format == "gray" and array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if (format == "gray" and array.ndim != 2) or (format in ("rgb", "bgr") and array.shape[2:] != (3,)):
            raise ValueError(
                f"{format} pixels of shape {array.shape} are not height x width{'' if format == 'gray' else ' x 3'}"
            )
        if format not in ("rgb", "bgr", "gray"):
            raise ValueError(f"from_array takes raw formats (rgb, bgr, gray), not {format!r}")
        return cls(array.tobytes(), format, width=array.shape[1], height=array.shape[0])


@dataclass(frozen=True)
class Frame:
    """A frame with its capture time: tensors, an image, or an image plus the model's other inputs.

    Attributes:
        inputs: arrays by input name (with `image`: the inputs other than the image's).
        image: the image for the model's image input.
        capture_time_ns: when it was captured, in `time.time_ns()` units; None stamps it as it is sent. The
            result echoes it, and `StreamResult.latency` is measured from it.
    """

    inputs: Inputs = field(default_factory=dict)
    image: Image | None = None
    capture_time_ns: int | None = None


@dataclass(frozen=True)
class Preprocessing:
    """How the server turns image frames into the model's input. Anything unset comes from the model's config
    (`image_*` parameters in config.pbtxt), else from the input's shape and dtype.

    The server decodes, converts to `color`, resizes to `width` x `height`, computes
    (pixel * scale - mean) / std per channel, casts to `dtype` and lays the result out as `layout`.

    Attributes:
        input: the model input that takes the image ("": the model's only input).
        color: "RGB", "BGR" or "GRAY": the channels the model takes.
        width: the width the model takes (0: the input's own, or the image's for a variable size).
        height: the height the model takes.
        layout: "NCHW" or "NHWC".
        dtype: the tensor's dtype name, e.g. "FP32" (None: the input's).
        scale: multiplies the 0..255 pixel values first (None: 1).
        mean: subtracted next: one value, or one per channel.
        std: divided by last: one value, or one per channel.
    """

    input: str = ""
    color: str | None = None
    width: int = 0
    height: int = 0
    layout: str | None = None
    dtype: str | None = None
    scale: float | None = None
    mean: Sequence[float] = ()
    std: Sequence[float] = ()

    def to_message(self) -> stream_pb2.Preprocessing:
        """The `Preprocessing` message; ValueError for a value no server would accept."""
        message = stream_pb2.Preprocessing(
            input=self.input, width=self.width, height=self.height, mean=list(self.mean), std=list(self.std)
        )
        if self.color is not None:
            if self.color.upper() not in _COLORS:
                raise ValueError(f"color {self.color!r} is not one of {', '.join(_COLORS)}")
            message.color = _COLORS[self.color.upper()]
        if self.layout is not None:
            if self.layout.upper() not in _LAYOUTS:
                raise ValueError(f"layout {self.layout!r} is not one of {', '.join(_LAYOUTS)}")
            message.layout = _LAYOUTS[self.layout.upper()]
        if self.dtype is not None:
            message.dtype = to_wire_dtype(dtype_name(dtype_from_name(self.dtype.upper())))
        if self.scale is not None:
            message.scale = self.scale
        return message


@dataclass(frozen=True)
class FrameTimings:
    """Where a frame's time on the server went, in seconds.

    Attributes:
        decode: decoding and preprocessing its image (or decoding its tensors).
        queue: waiting among the stream's frames for a slot, then in the model's batch queue.
        infer: running the batch that held it.
        server: from its arrival at the server to its result being ready to send.
    """

    decode: float = 0.0
    queue: float = 0.0
    infer: float = 0.0
    server: float = 0.0

    @classmethod
    def from_message(cls, message: stream_pb2.FrameTimings) -> FrameTimings:
        """From the message's nanoseconds."""
        return cls(message.decode_ns / 1e9, message.queue_ns / 1e9, message.infer_ns / 1e9, message.server_ns / 1e9)


def build_config(
    model: str,
    *,
    version: int,
    outputs: list[str],
    policy: str | None = None,
    queue_size: int = 0,
    max_in_flight: int = 0,
    preprocessing: Preprocessing | None = None,
) -> stream_pb2.StreamConfig:
    """The stream's `StreamConfig`; ValueError for settings no server would accept."""
    config = stream_pb2.StreamConfig(model=model, version=version, outputs=outputs)
    if policy is not None:
        if policy not in DROP_POLICIES:
            raise ValueError(f"policy {policy!r} is not one of {', '.join(DROP_POLICIES)}")
        config.drop_policy = DROP_POLICIES[policy]
    if queue_size < 0 or max_in_flight < 0:
        raise ValueError("queue_size and max_in_flight must be >= 0 (0: the server's default)")
    config.queue_size = queue_size
    config.max_in_flight = max_in_flight
    if preprocessing is not None:
        config.preprocessing.CopyFrom(preprocessing.to_message())
    return config


def _encode_inputs(inputs: Inputs) -> list[Any]:
    if not isinstance(inputs, Mapping):
        raise TypeError(f"a frame's inputs must be a mapping of name to array, not {type(inputs).__name__}")
    return [to_tensor(name, value) for name, value in inputs.items()]


def build_frame(frame: Inputs | Image | Frame, sequence: int) -> stream_pb2.Frame:
    """The `Frame` message of one frame: its tensors and/or image, stamped with its capture time."""
    if isinstance(frame, Image):
        frame = Frame(image=frame)
    elif not isinstance(frame, Frame):
        frame = Frame(inputs=frame)
    message = stream_pb2.Frame(
        sequence=sequence,
        inputs=_encode_inputs(frame.inputs),
        capture_time_ns=time.time_ns() if frame.capture_time_ns is None else frame.capture_time_ns,
    )
    if frame.image is not None:
        image = frame.image
        message.image.CopyFrom(
            stream_pb2.Image(
                format=IMAGE_FORMATS[image.format], data=image.data, width=image.width, height=image.height
            )
        )
    return message
