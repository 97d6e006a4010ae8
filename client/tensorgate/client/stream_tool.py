"""`tensorgate stream`: stream frames from a camera, a video file or a synthetic source, with live statistics.

    tensorgate stream --model digits --source synthetic --fps 30 --duration 10
    tensorgate stream --model detector --source clip.mp4 --fps 30    # pip install 'tensorgate-client[video]'
    tensorgate stream --model detector --source /dev/video0 --policy latest

While it runs, one status line (stderr) shows the input and result rates, the end-to-end latency (capture to
result, on this machine's clock) p50/p99 over the last seconds, and the frames the server dropped; at the end it
prints a summary (stdout; `--json` for a machine-readable one). Ctrl-C stops the source and prints the summary.

Synthetic frames are raw RGB by default (no extra dependency); video files and cameras are read with OpenCV and
sent as JPEG by default, so the server decodes and preprocesses them (see `--image-*` and the model's config).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from tensorgate.client._common import StreamResult
from tensorgate.client._sync import Client
from tensorgate.client.frames import DROP_POLICIES, Frame, Image, Preprocessing

__all__ = [
    "LiveStats",
    "StreamSummary",
    "add_parser",
    "paced",
    "run",
    "synthetic_images",
    "video_images",
]

VIDEO_EXTRA_HINT = "reading video files and cameras needs OpenCV: pip install 'tensorgate-client[video]'"


class SourceError(Exception):
    """The frame source cannot be opened or read (exit status 2)."""


# -- sources ----------------------------------------------------------------------------------------------------


def _size(value: str) -> tuple[int, int]:
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {value!r}")
    return int(width), int(height)


def _cv2() -> Any:
    try:
        return importlib.import_module("cv2")
    except ImportError:
        raise SourceError(VIDEO_EXTRA_HINT) from None


def _encode(pixels_bgr: npt.NDArray[np.uint8], encoding: str) -> Image:
    """An Image of BGR pixels: raw, or JPEG/PNG encoded with OpenCV."""
    if encoding == "raw":
        return Image.from_array(pixels_bgr, "bgr")
    ok, buffer = _cv2().imencode(".jpg" if encoding == "jpeg" else ".png", pixels_bgr)
    if not ok:
        raise SourceError(f"OpenCV cannot encode a frame as {encoding}")
    return Image(bytes(buffer), encoding)


def synthetic_images(width: int, height: int, encoding: str = "raw", distinct: int = 30) -> Iterator[Image]:
    """An endless camera-like sequence: a bright bar sweeping over a gradient, `distinct` frames repeated."""
    rows = np.linspace(0, 160, height, dtype=np.float32)[:, None]
    columns = np.linspace(0, 60, width, dtype=np.float32)[None, :]
    background = (rows + columns).astype(np.uint8)
    images = []
    for index in range(distinct):
        pixels = np.stack([background, np.flipud(background), np.fliplr(background)], axis=-1)
        start = index * width // distinct
        pixels[:, start : start + max(1, width // 10)] = 255
        images.append(_encode(np.ascontiguousarray(pixels), encoding))
    while True:
        yield from images


def video_images(source: str, encoding: str = "jpeg", *, fps: float = 0.0, loop: bool = False) -> Iterator[Image]:
    """Frames of a video file, or of a camera such as /dev/video0 (OpenCV), as Images."""
    cv2 = _cv2()
    camera = source.startswith("/dev/video")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise SourceError(f"cannot open {source} as a {'camera' if camera else 'video file'}")
    if camera and fps > 0:
        capture.set(cv2.CAP_PROP_FPS, fps)
    try:
        sent = 0
        while True:
            ok, pixels = capture.read()
            if not ok:
                if loop and sent and not camera:
                    capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    sent = 0
                    continue
                if not sent and not camera:
                    raise SourceError(f"{source}: no frame can be read")
                return
            sent += 1
            yield _encode(pixels, encoding)
    finally:
        capture.release()


def paced(
    images: Iterator[Image],
    fps: float,
    *,
    frames: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
    on_sent: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[Frame]:
    """`images` as Frames at `fps` (0: as fast as they come), each stamped with its capture time.

    Like a camera, a source that falls behind does not catch up in a burst: its schedule moves on. Stops after
    `frames` frames, after `duration` seconds, when `stop` is set, or when `images` ends.
    """
    interval = 1.0 / fps if fps > 0 else 0.0
    start = clock()
    due = start
    for count, image in enumerate(images):
        if (stop is not None and stop.is_set()) or (frames is not None and count >= frames):
            return
        if interval:
            now = clock()
            if due > now:
                sleep(due - now)
            elif now - due > interval:
                due = now  # more than a frame late: go now and keep the pace from here, as a camera would
            due += interval
        if duration is not None and clock() - start >= duration - 1e-9:
            return
        if on_sent is not None:
            on_sent()
        yield Frame(image=image, capture_time_ns=time.time_ns())


# -- statistics -------------------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


@dataclass
class StreamSummary:
    """What a run of `tensorgate stream` did. Latencies and timings in milliseconds."""

    model: str
    source: str
    policy: str
    seconds: float
    sent: int
    results: int
    ok: int
    errors: int
    dropped: int
    input_fps: float
    results_fps: float
    latency_ms: dict[str, float]
    server_ms: dict[str, float]
    first_errors: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The summary as lines of text."""
        latency = self.latency_ms
        server = self.server_ms
        dropped_share = 100.0 * self.dropped / self.sent if self.sent else 0.0
        lines = [
            f"model {self.model}, source {self.source}, policy {self.policy}, {self.seconds:.1f} s",
            f"frames    sent {self.sent} ({self.input_fps:.1f} fps), results {self.results} "
            f"({self.results_fps:.1f} fps): {self.ok} ok, {self.errors} errors; "
            f"dropped by the server {self.dropped} ({dropped_share:.1f}%)",
            f"latency   capture to result: p50 {latency['p50']:.1f} ms, p90 {latency['p90']:.1f} ms, "
            f"p99 {latency['p99']:.1f} ms, max {latency['max']:.1f} ms",
            f"server    mean per frame: decode {server['decode']:.2f} ms, queue {server['queue']:.2f} ms, "
            f"infer {server['infer']:.2f} ms, total {server['server']:.2f} ms",
        ]
        lines.extend(f"error     {message}" for message in self.first_errors)
        return "\n".join(lines)


class LiveStats:
    """Counts a stream's frames and results; `status()` is the live line, `summary()` the end."""

    def __init__(self, window: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self.started = clock()
        self.sent = 0
        self.results = 0
        self.errors = 0
        self.dropped = 0
        self.latencies: list[float] = []
        self._stages = np.zeros(4)
        self._recent: deque[tuple[float, float]] = deque()  # (received, latency)
        self._recent_sent: deque[float] = deque()
        self.first_errors: list[str] = []

    def frame_sent(self) -> None:
        """A frame left the source (called from the sending thread)."""
        self.sent += 1
        self._recent_sent.append(self._clock())

    def result(self, result: StreamResult) -> None:
        """A result arrived."""
        now = self._clock()
        self.results += 1
        self.dropped += result.dropped
        if result.error is not None:
            self.errors += 1
            if len(self.first_errors) < 3:
                self.first_errors.append(f"frame {result.sequence}: {result.error.code}: {result.error.message}")
        else:
            timings = result.timings
            self._stages += (timings.decode, timings.queue, timings.infer, timings.server)
        latency = result.latency
        if latency is not None:
            self.latencies.append(latency)
            self._recent.append((now, latency))
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def status(self) -> str:
        """The live line: rates and latencies over the last `window` seconds, totals since the start."""
        now = self._clock()
        while self._recent_sent and self._recent_sent[0] < now - self.window:
            self._recent_sent.popleft()
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()
        span = min(self.window, max(now - self.started, 1e-9))
        recent = [latency for _, latency in self._recent]
        return (
            f"in {len(self._recent_sent) / span:5.1f} fps | out {len(recent) / span:5.1f} fps | "
            f"e2e p50 {1e3 * _percentile(recent, 50):6.1f} ms p99 {1e3 * _percentile(recent, 99):6.1f} ms | "
            f"dropped {self.dropped} | errors {self.errors} | {now - self.started:5.1f} s"
        )

    def summary(self, model: str, source: str, policy: str) -> StreamSummary:
        """Totals and latency percentiles over the whole run."""
        seconds = max(self._clock() - self.started, 1e-9)
        ok = self.results - self.errors
        stages = self._stages / ok * 1e3 if ok else np.full(4, math.nan)
        latencies = self.latencies
        return StreamSummary(
            model=model,
            source=source,
            policy=policy,
            seconds=seconds,
            sent=self.sent,
            results=self.results,
            ok=ok,
            errors=self.errors,
            dropped=self.dropped,
            input_fps=self.sent / seconds,
            results_fps=self.results / seconds,
            latency_ms={
                "p50": 1e3 * _percentile(latencies, 50),
                "p90": 1e3 * _percentile(latencies, 90),
                "p99": 1e3 * _percentile(latencies, 99),
                "max": 1e3 * max(latencies) if latencies else math.nan,
                "mean": 1e3 * float(np.mean(latencies)) if latencies else math.nan,
            },
            server_ms=dict(zip(("decode", "queue", "infer", "server"), map(float, stages), strict=True)),
            first_errors=self.first_errors,
        )


class _Display:
    """The live status line: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, out: TextIO, *, enabled: bool) -> None:
        self._out = out
        self._enabled = enabled
        self._tty = out.isatty()
        self._every = 0.25 if self._tty else 5.0
        self._last = time.monotonic()
        self._shown = False

    def update(self, line: Callable[[], str]) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._last < self._every:
            return
        self._last = now
        if self._tty:
            self._out.write("\r\x1b[2K" + line())
            self._shown = True
        else:
            self._out.write(line() + "\n")
        self._out.flush()

    def finish(self) -> None:
        if self._shown:
            self._out.write("\n")
            self._out.flush()
            self._shown = False


# -- the command ------------------------------------------------------------------------------------------------


def _numbers(value: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _rate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0 or math.isinf(number):
        raise argparse.ArgumentTypeError(f"expected frames per second >= 0, got {value!r}")
    return number


def _seconds(value: str) -> float:
    number = _rate(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return number


ClientFactory = Callable[[argparse.Namespace], Client]


def add_parser(commands: Any, connection: argparse.ArgumentParser, client: ClientFactory) -> None:
    """Add the `stream` command to the `tensorgate` subcommands; `client` makes the client from the arguments."""
    parser = commands.add_parser(
        "stream",
        parents=[connection],
        help="stream frames (camera, video file, synthetic) and show live latency and drops",
        description=(__doc__ or "").split("\n\n", 1)[0],
        epilog="Video files and cameras need OpenCV: pip install 'tensorgate-client[video]'.",
    )
    parser.add_argument("--model", required=True, help="the model's name")
    parser.add_argument("--version", type=_count, help="model version (default: the server's)")
    parser.add_argument("--output", "-o", dest="outputs", action="append", metavar="NAME", help="return only this")
    source = parser.add_argument_group("source")
    source.add_argument(
        "--source", default="synthetic", help="synthetic (default), a video FILE, or a camera such as /dev/video0"
    )
    source.add_argument("--fps", type=_rate, default=30.0, help="frames per second to send (0: as fast as read)")
    source.add_argument("--frames", type=_count, metavar="N", help="stop after N frames")
    source.add_argument("--duration", type=_seconds, metavar="SECONDS", help="stop after this many seconds")
    source.add_argument("--size", type=_size, default=(640, 480), help="synthetic frame size (default 640x480)")
    source.add_argument(
        "--encoding",
        choices=("raw", "jpeg", "png"),
        help="how frames travel (default: raw for synthetic, jpeg for video); jpeg and png need OpenCV",
    )
    source.add_argument("--loop", action="store_true", help="replay a video file from the start when it ends")
    stream = parser.add_argument_group("stream")
    stream.add_argument("--policy", choices=tuple(DROP_POLICIES), help="server drop policy (default: latest)")
    stream.add_argument("--queue-size", type=_count, default=0, metavar="N", help="frames waiting (queue, block)")
    stream.add_argument("--max-in-flight", type=_count, default=0, metavar="N", help="frames in the pipeline")
    image = parser.add_argument_group("preprocessing (default: the model's config and input shape)")
    image.add_argument("--image-input", metavar="NAME", help="the model input that takes the image")
    image.add_argument("--image-color", choices=("RGB", "BGR", "GRAY"), help="channels the model takes")
    image.add_argument("--image-size", type=_size, metavar="WxH", help="size the model takes")
    image.add_argument("--image-layout", choices=("NCHW", "NHWC"), help="where the channels are")
    image.add_argument("--image-dtype", metavar="DTYPE", help="tensor dtype, e.g. FP32")
    image.add_argument("--image-scale", type=float, metavar="F", help="multiplies 0..255 pixels first")
    image.add_argument("--image-mean", type=_numbers, metavar="M[,M,M]", help="subtracted per channel")
    image.add_argument("--image-std", type=_numbers, metavar="S[,S,S]", help="divided by per channel")
    show = parser.add_argument_group("output")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.add_argument("--quiet", "-q", action="store_true", help="no live status line")
    parser.set_defaults(run=lambda args: run(args, client(args)))


def _preprocessing(args: argparse.Namespace) -> Preprocessing | None:
    values = (args.image_input, args.image_color, args.image_size, args.image_layout, args.image_dtype)
    extra = (args.image_scale, args.image_mean, args.image_std)
    if all(value is None for value in (*values, *extra)):
        return None
    width, height = args.image_size or (0, 0)
    return Preprocessing(
        input=args.image_input or "",
        color=args.image_color,
        width=width,
        height=height,
        layout=args.image_layout,
        dtype=args.image_dtype,
        scale=args.image_scale,
        mean=args.image_mean or (),
        std=args.image_std or (),
    )


def _images(args: argparse.Namespace) -> Iterator[Image]:
    if args.source == "synthetic":
        width, height = args.size
        return synthetic_images(width, height, encoding=args.encoding or "raw")
    return video_images(args.source, args.encoding or "jpeg", fps=args.fps, loop=args.loop)


def run(args: argparse.Namespace, client: Client, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run `tensorgate stream` with parsed arguments over `client` (closed on return); return the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    with client:
        try:
            preprocessing = _preprocessing(args)
            if preprocessing is not None:
                preprocessing.to_message()  # check the values before anything starts
            images = _images(args)
            first = next(images)  # open the source (and fail on a bad one) before streaming
        except (SourceError, ValueError) as exc:
            err.write(f"error: {exc}\n")
            return 2
        except StopIteration:
            err.write(f"error: {args.source}: no frames\n")
            return 2
        return _stream(args, client, first, images, out, err)


def _stream(
    args: argparse.Namespace, client: Client, first: Image, images: Iterator[Image], out: TextIO, err: TextIO
) -> int:

    def replay() -> Iterator[Image]:
        yield first
        yield from images

    stats = LiveStats()
    stop = threading.Event()
    display = _Display(err, enabled=not args.quiet)
    camera = args.source.startswith("/dev/video")
    frames = paced(
        replay(),
        0.0 if camera else args.fps,  # a camera keeps its own pace
        frames=args.frames,
        duration=args.duration,
        stop=stop,
        on_sent=stats.frame_sent,
    )
    results = client.stream(
        args.model,
        frames,
        version=args.version,
        outputs=args.outputs,
        policy=args.policy,
        queue_size=args.queue_size,
        max_in_flight=args.max_in_flight,
        preprocessing=_preprocessing(args),
    )
    status = 0
    try:
        for result in results:
            stats.result(result)
            display.update(stats.status)
    except KeyboardInterrupt:
        stop.set()
    except SourceError as exc:  # the source failed midway: say so, and summarise what was streamed
        display.finish()
        err.write(f"error: {exc}\n")
        status = 2
    finally:
        results.close()
        display.finish()
    summary = stats.summary(args.model, args.source, args.policy or "latest")
    out.write((json.dumps(asdict(summary), indent=2) if args.json else summary.text()) + "\n")
    return status
