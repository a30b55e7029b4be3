"""Read a video and sample its frames as qwen-vl-utils' `fetch_video` does: SPEC section 2.1.

    frames, sample_fps = read_video("clip.mp4")            # uint8 [F, H, W, 3], H and W multiples of 28
    batch = processor(text=prompt, videos=[frames], fps=sample_fps)

Sources: a video file (PyAV, the `video` extra), an animated GIF / WebP (Pillow; frame durations
give the native fps) or a directory of image frames (sorted by file name, native rate = `fps`).
Frame count and indices follow qwen-vl-utils exactly; the frame size is its smart_resize with the
per-frame share of the total pixel budget. Frames are resized with Pillow bicubic, while
qwen-vl-utils uses torchvision's antialiased bicubic: pixels differ by a few uint8 levels (SPEC 1.2).
Feeding these frames to `Processor` is then an exact no-op resize (SPEC 2.2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image

from qwenvl_jax.config import is_finite_number
from qwenvl_jax.processing.image import MAX_BUDGET_PIXELS, load_image, resize, smart_resize

# qwen-vl-utils constants (identical in 0.0.10 and 0.0.14, SPEC 2.1)
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28  # 100352
VIDEO_MAX_PIXELS = 768 * 28 * 28  # 602112, the per-frame cap
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90316800, shared by all frames
IMAGE_FACTOR = 28  # patch_size * merge_size
# What one video's sampled frames may hold: the most qwen-vl-utils' defaults give (frames come in
# pairs, so 2x total_pixels; 115,200 tokens, 90% of the released models' 128k context): about
# 0.54 GB of uint8 frames. More could not fit the context; it is refused before decoding.
MAX_VIDEO_PIXELS = 2 * VIDEO_TOTAL_PIXELS

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg", ".ts",
                  ".3gp", ".ogv"}
ANIMATED_SUFFIXES = {".gif", ".webp"}
FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class VideoLoadError(ValueError):
    """A video that cannot be read: missing, undecodable, unsupported, or with too few frames."""


class VideoOptionError(VideoLoadError):
    """Bad read options, or options this video cannot meet (a clip outside it, more frames than it
    holds, frames past MAX_VIDEO_PIXELS)."""


# ------------------------------------------------------------------------------- sampling (pure)

def smart_nframes(total_frames: int, video_fps: float, *, fps: float = FPS, nframes: int | None = None,
                  min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES) -> int:
    """Number of frames to sample: even, within [min_frames, max_frames] and at most total_frames.

    `nframes` wins over `fps` (qwen-vl-utils forbids giving both). Python `round` is half to even.
    Raises ValueError unless 2 <= result <= total_frames.
    """
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"too few frames: cannot sample nframes={n} from {total_frames} frame(s) "
                         f"(need {FRAME_FACTOR} <= nframes <= total)")
    return int(n)


def frame_indices(total_frames: int, nframes: int, start: int = 0) -> np.ndarray:
    """int64 [nframes]: torch.linspace(start, total-1, nframes) in float32, rounded half to even.

    torch's CPU kernel takes a float32 step, counts the second half back from the end, and rounds
    each value once (fused multiply-add); float32 step with one float64 multiply-add reproduces it,
    so near-.5 values round as in qwen-vl-utils (a plain float64 linspace differs for a few % of sizes).
    """
    if nframes == 1:
        return np.full(1, start, np.int64)
    first, end = np.float32(start), np.float32(total_frames - 1)
    step = np.float64((end - first) / np.float32(nframes - 1))
    i = np.arange(nframes)
    x = np.where(i < nframes // 2, np.float64(first) + step * i,
                 np.float64(end) - step * (nframes - 1 - i))  # exact in f64, one rounding to f32
    return np.rint(x.astype(np.float32)).astype(np.int64)


def clip_frame_range(total_frames: int, video_fps: float, video_start: float | None = None,
                     video_end: float | None = None) -> tuple[int, int]:
    """(first, last) frame index of the `video_start`..`video_end` seconds, as qwen-vl-utils' decord
    reader takes them: times clamped to the video, first = ceil(start * fps), last = floor(end * fps).

    Raises ValueError when the range holds fewer than 2 frames (qwen-vl-utils: start >= end).
    """
    if video_start is None and video_end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(video_start, duration)) * video_fps) if video_start is not None else 0
    last = (min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
            if video_end is not None else total_frames - 1)
    if first >= last:
        raise ValueError(f"video_start={video_start} .. video_end={video_end} s holds fewer than 2 frames of "
                         f"this {duration:.3g} s video ({total_frames} frames at {video_fps:.4g} fps)")
    return first, last


def frame_pixel_limits(nframes: int, *, min_pixels: int | None = None, max_pixels: float | None = None,
                       total_pixels: float | None = None) -> tuple[int, float]:
    """(min_pixels, max_pixels) for each of `nframes` frames: the total budget shared per frame pair.

    max = max(min(602112, total/nframes*2), int(1.05*min)); a user max_pixels can only lower it.
    """
    lo = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    total = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    hi = max(min(VIDEO_MAX_PIXELS, total / nframes * FRAME_FACTOR), int(lo * 1.05))
    return lo, hi if max_pixels is None else min(max_pixels, hi)


def second_per_grid_t(sample_fps: float, temporal_patch_size: int = 2) -> float:
    """Seconds covered by one temporal patch: the model's `second_per_grid_ts` entry (SPEC 2.3)."""
    return temporal_patch_size / sample_fps


def check_read_options(**options) -> None:
    """ValueError naming the first bad read_video option (given as keywords; None = not given)."""
    for name in ("fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels"):
        value = options.get(name)
        if value is not None and not (is_finite_number(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    for name in ("video_start", "video_end"):
        value = options.get(name)
        if value is not None and not (is_finite_number(value) and value >= 0):
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    for lo, hi in (("min_pixels", "max_pixels"), ("min_frames", "max_frames")):
        if options.get(lo) is not None and options.get(hi) is not None and options[lo] > options[hi]:
            raise ValueError(f"{lo} ({options[lo]}) must not exceed {hi} ({options[hi]})")
    start, end = options.get("video_start"), options.get("video_end")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"video_start ({start}) must be before video_end ({end})")
    if options.get("min_pixels") is not None and options["min_pixels"] > MAX_BUDGET_PIXELS:
        raise ValueError(f"min_pixels must be at most {MAX_BUDGET_PIXELS}, got {options['min_pixels']!r}")


# ------------------------------------------------------------------------------------- readers

def _av():
    try:
        import av  # lazily: an optional dependency
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install qwenvl_jax[video]") from None
    return av


def _error(path: Path, reason) -> VideoLoadError:
    reason = " ".join(str(reason).split()) or type(reason).__name__
    return VideoLoadError(f"cannot read video {path}: {reason}")


class _Sampler:
    """Keeps the frames at `indices` (repeats allowed), each resized on arrival to one shared size.

    The size is smart_resize of the first kept frame under `limits`, so no full-size video is held;
    a size whose frames together pass MAX_VIDEO_PIXELS is refused before a second frame is decoded.
    `span`: the frames the indices were sampled from (the clip's length), for the sample fps.
    """

    def __init__(self, indices: np.ndarray, limits: tuple[int, float], span: int):
        self.indices, self.limits, self.span = indices, limits, span  # int64 [F], (min_pixels, max_pixels)
        self.wanted, self.size, self.frames = set(indices.tolist()), None, {}

    def offer(self, i: int, get_image):
        if i in self.wanted and i not in self.frames:
            image = get_image()
            if self.size is None:
                self.size = smart_resize(image.height, image.width, IMAGE_FACTOR, *self.limits,
                                         variant="qwen_vl_utils")
                pixels = len(self.indices) * self.size[0] * self.size[1]
                if pixels > MAX_VIDEO_PIXELS:
                    raise VideoOptionError(
                        f"{len(self.indices)} frames of {self.size[1]}x{self.size[0]} pixels ({pixels}) pass the "
                        f"per-video limit of {MAX_VIDEO_PIXELS} (2x qwen-vl-utils' total_pixels, the most the "
                        f"128k-token context holds): lower min_pixels, nframes or fps")
            self.frames[i] = resize(image, *self.size)  # [H, W, 3] uint8

    def stack(self) -> np.ndarray:
        return np.stack([self.frames[i] for i in self.indices.tolist()])  # [F, H, W, 3]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """read_video's sampling options: (total_frames, native fps) -> the _Sampler of SPEC 2.1."""

    fps: float
    nframes: int | None
    min_frames: int
    max_frames: int
    min_pixels: int | None
    max_pixels: float | None
    total_pixels: float | None
    video_start: float | None = None
    video_end: float | None = None

    def limits(self, nframes: int) -> tuple[int, float]:
        return frame_pixel_limits(nframes, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                                  total_pixels=self.total_pixels)

    def __call__(self, total_frames: int, video_fps: float) -> _Sampler:
        try:
            first, last = clip_frame_range(total_frames, video_fps, self.video_start, self.video_end)
        except ValueError as e:
            raise VideoOptionError(e) from None
        span = last - first + 1
        try:
            n = smart_nframes(span, video_fps, fps=self.fps, nframes=self.nframes, min_frames=self.min_frames,
                              max_frames=self.max_frames)
        except ValueError as e:  # more frames asked for than the clip holds (else: the video is too short)
            if self.nframes is not None:
                raise VideoOptionError(e) from None
            raise
        return _Sampler(frame_indices(last + 1, n, first), self.limits(n), span)


def _read_file(path: Path, plan: _Plan) -> tuple[np.ndarray, int, float]:
    """PyAV. -> (frames, total_frames, native fps); plan(total, fps) -> _Sampler.

    qwen-vl-utils' torchvision reader counts decoded frames. The container's count (mp4 index) or,
    when it has none (webm), the packet count usually equals it, so one decoding pass suffices;
    if decoding disagrees, sample again from the decoded count.
    """
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _error(path, "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise _error(path, "unknown frame rate")
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        for _ in range(2):
            sampler, decoded = plan(total, float(rate)), 0
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):  # presentation order
                    sampler.offer(decoded, frame.to_image)
                    decoded += 1
            if decoded == total:
                return sampler.stack(), sampler.span, float(rate)
            if decoded == 0:
                raise _error(path, "no decodable video frames")
            total = decoded
    except av.error.FFmpegError as e:  # str(e) repeats errno and path; strerror is the reason
        raise _error(path, e.strerror or e) from None
    raise _error(path, f"decoded frame count changed between passes ({total})")


def _read_animated(path: Path, plan: _Plan, default_fps: float) -> tuple[np.ndarray, int, float]:
    """Pillow GIF / animated WebP. Native fps = frames / summed durations (`default_fps` if none)."""
    try:
        with Image.open(path) as im:
            total = getattr(im, "n_frames", 1)
            milliseconds = 0
            for i in range(total):
                im.seek(i)
                im.load()  # WebP sets a frame's duration only when it is loaded
                milliseconds += im.info.get("duration") or 0
            video_fps = total / (milliseconds / 1000) if milliseconds > 0 else default_fps
            sampler = plan(total, video_fps)
            for i in sorted(sampler.wanted):
                im.seek(i)
                sampler.offer(i, lambda: load_image(im.copy()))  # alpha onto white, as for images
            return sampler.stack(), sampler.span, video_fps
    except (OSError, SyntaxError, EOFError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise _error(path, e) from None


def _read_directory(path: Path, plan: _Plan, fps: float) -> tuple[np.ndarray, int, float]:
    """Image files sorted by name, as a frame list at native rate `fps` (a clip first cut to its range)."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise _error(path, f"no image frames ({', '.join(sorted(FRAME_SUFFIXES))}) in the directory")
    try:
        first, last = clip_frame_range(len(files), fps, plan.video_start, plan.video_end)
    except ValueError as e:
        raise VideoOptionError(e) from None
    files, plan = files[first:last + 1], dataclasses.replace(plan, video_start=None, video_end=None)
    if plan.nframes is None and len(files) <= plan.max_frames:
        # qwen-vl-utils keeps a frame list whole and pads an odd count by repeating the last frame
        n = len(files) + len(files) % FRAME_FACTOR
        sampler = _Sampler(np.minimum(np.arange(n), len(files) - 1), plan.limits(n), n)
    else:
        sampler = plan(len(files), fps)
    for i in sorted(sampler.wanted):
        sampler.offer(i, functools.partial(load_image, files[i]))
    return sampler.stack(), sampler.span, fps


def read_video(src, *, fps: float = FPS, nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES,
               max_frames: int = FPS_MAX_FRAMES, min_pixels: int | None = None, max_pixels: float | None = None,
               total_pixels: float | None = None, video_start: float | None = None,
               video_end: float | None = None) -> tuple[np.ndarray, float]:
    """Video file / GIF / WebP / frame directory -> (frames uint8 [F, H, W, 3], sample_fps).

    F = smart_nframes(total, native_fps, ...) frames at frame_indices(total, F); H, W = qwen-vl-utils
    smart_resize (factor 28) under frame_pixel_limits(F, ...); sample_fps = F / total * native_fps,
    and second_per_grid_t(sample_fps) is the model's timing input. `nframes` overrides `fps`.
    video_start / video_end (seconds) cut a clip first, as qwen-vl-utils' decord reader does: frames
    are sampled from clip_frame_range's frames and sample_fps = F / clip frames * native_fps.

    A directory is a frame list whose native rate is `fps`, as qwen-vl-utils treats one: all frames
    are kept (an odd count repeats the last one) unless there are more than max_frames or `nframes`
    is given, and sample_fps is then `fps`. Unlike qwen-vl-utils' list path (image pixel limits per
    frame, no clip), directory frames get the video pixel budget and clip, like any other video.
    Sampled frames together hold at most MAX_VIDEO_PIXELS pixels.
    Raises VideoLoadError (a ValueError) naming the path and the reason.
    """
    path = Path(src)
    try:
        check_read_options(fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames,
                           min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
                           video_start=video_start, video_end=video_end)
    except ValueError as e:
        raise VideoOptionError(f"cannot read video {path}: {e}") from None
    plan = _Plan(fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames, min_pixels=min_pixels,
                 max_pixels=max_pixels, total_pixels=total_pixels, video_start=video_start, video_end=video_end)
    suffix = path.suffix.lower()
    try:
        if not path.exists():
            raise _error(path, "no such file or directory")
        if path.is_dir():
            frames, total, video_fps = _read_directory(path, plan, fps)
        elif not path.is_file():  # a FIFO or a device would block or never end
            raise _error(path, "not a regular file or a frame directory (a pipe, socket or device)")
        elif suffix in ANIMATED_SUFFIXES:
            frames, total, video_fps = _read_animated(path, plan, fps)
        elif suffix in VIDEO_SUFFIXES:
            frames, total, video_fps = _read_file(path, plan)
        else:
            raise _error(path, f"unsupported extension {suffix or '(none)'!r}; expected a frame directory or one "
                               f"of {', '.join(sorted(VIDEO_SUFFIXES | ANIMATED_SUFFIXES))}")
    except VideoOptionError as e:
        raise VideoOptionError(f"cannot read video {path}: {e}") from None
    except (VideoLoadError, MemoryError, ImportError):  # a missing PyAV says how to install it
        raise
    except Exception as e:  # noqa: BLE001 - decoders (PIL, PyAV) raise many types on damaged data: all mean "corrupt"
        raise _error(path, e) from None
    return frames, frames.shape[0] / total * video_fps
