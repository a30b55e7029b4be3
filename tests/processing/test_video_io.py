"""Video reading and frame sampling against SPEC 2.1 (qwen-vl-utils `fetch_video`) and torch.linspace.

Sampling is checked on frame counts alone against the SPEC's worked-example table (computed there by
running qwen-vl-utils); the readers on tiny videos, GIFs, WebPs and frame folders written here, whose
frames are solid colours so every sampled frame can be identified after decoding.
"""

import itertools
import math
import re
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl_jax.processing import video_io
from qwenvl_jax.processing.image import smart_resize
from qwenvl_jax.processing.video import preprocess_video
from qwenvl_jax.processing.video_io import (
    MAX_VIDEO_PIXELS,
    VideoLoadError,
    clip_frame_range,
    frame_indices,
    frame_pixel_limits,
    read_video,
    second_per_grid_t,
    smart_nframes,
)

# 27 colours far apart (levels 0/128/255), so lossy codecs cannot turn one into another
PALETTE = np.array(list(itertools.product((0, 128, 255), repeat=3)), np.uint8)
H, W = 64, 96
# a 64x96 frame is lifted to the 100352-pixel minimum: ceil(64*4.04/28)*28 x ceil(96*4.04/28)*28
FRAME_HW = (280, 392)


def _colour_ids(frames: np.ndarray) -> list[int]:
    """Nearest palette colour of each frame's mean: which source frame each decoded frame is."""
    means = frames.reshape(len(frames), -1, 3).mean(1)  # [F, 3]
    return np.abs(means[:, None] - PALETTE[None].astype(float)).sum(-1).argmin(1).tolist()


def _write_video(path, n=24, fps=8, codec="libx264", options=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = options or {}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), PALETTE[i], np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _solid(i: int) -> Image.Image:
    return Image.new("RGB", (W, H), tuple(int(v) for v in PALETTE[i]))


# --------------------------------------------------------------------------- sampling, SPEC table

# (total frames, native fps) -> (nframes, idx[:4], sample_fps, second_per_grid_t, 720p frame size)
SPEC_TABLE = [
    ((300, 30.0), (20, [0, 16, 31, 47], 2.0, 1.0, (560, 1008))),
    ((37, 29.97), (4, [0, 12, 24, 36], 3.24, 0.617, (560, 1008))),
    ((46000, 30.0), (768, [0, 60, 120, 180], 0.501, 3.993, (336, 644))),
]


@pytest.mark.parametrize("video,expected", SPEC_TABLE)
def test_sampling_matches_spec_table(video, expected):
    total, video_fps = video
    n_expected, idx4, fps_expected, spgt_expected, size_expected = expected
    n = smart_nframes(total, video_fps)
    idx = frame_indices(total, n)
    sample_fps = n / total * video_fps
    assert n == n_expected and idx[:4].tolist() == idx4
    assert idx[0] == 0 and idx[-1] == total - 1 and np.all(np.diff(idx) > 0)
    assert sample_fps == pytest.approx(fps_expected, abs=1e-3)
    assert second_per_grid_t(sample_fps) == pytest.approx(spgt_expected, abs=1e-3)
    # per-frame budget on a 720p frame, then LLM tokens = frames/2 * (h/28) * (w/28)
    size = smart_resize(720, 1280, 28, *frame_pixel_limits(n), variant="qwen_vl_utils")
    assert size == size_expected
    tokens = {20: 7200, 4: 1440, 768: 105984}[n]
    assert n // 2 * (size[0] // 28) * (size[1] // 28) == tokens


def test_frame_pixel_limits():
    assert frame_pixel_limits(768) == (100352, 235200)  # 90316800 / 768 * 2
    assert frame_pixel_limits(20) == (100352, 602112)  # capped per frame
    assert frame_pixel_limits(10**6)[1] == int(100352 * 1.05)  # floor at 1.05 * min_pixels
    assert frame_pixel_limits(20, max_pixels=200000)[1] == 200000  # a user max can only lower it
    assert frame_pixel_limits(20, max_pixels=10**7)[1] == 602112
    assert frame_pixel_limits(4, total_pixels=4 * 28 * 28 * 200, min_pixels=3136) == (3136, 2 * 28 * 28 * 200)


def test_smart_nframes_rules():
    assert smart_nframes(300, 30, nframes=7) == 8 and smart_nframes(300, 30, nframes=5) == 4  # half to even
    assert smart_nframes(300, 30, fps=1.0) == 10
    assert smart_nframes(300, 30, fps=0.1, min_frames=5) == 6  # min rounded up to even
    assert smart_nframes(300, 30, fps=30, max_frames=41) == 40  # max rounded down to even
    assert smart_nframes(7, 1) == 6  # capped by the frame count, then even
    with pytest.raises(ValueError, match="too few frames"):
        smart_nframes(1, 30)
    with pytest.raises(ValueError, match="too few frames"):
        smart_nframes(10, 30, nframes=12)


def test_frame_indices_match_torch_linspace():
    # qwen-vl-utils: torch.linspace(0, total-1, n) (float32) .round() (half to even) .long()
    for total in range(2, 301):
        for n in range(2, total + 1):
            ref = torch.linspace(0, total - 1, n).round().long().numpy()
            np.testing.assert_array_equal(frame_indices(total, n), ref, err_msg=f"total={total} n={n}")
    assert frame_indices(5, 3).tolist() == [0, 2, 4] and frame_indices(4, 3).tolist() == [0, 2, 3]  # 1.5 -> 2


# ------------------------------------------------------------------------------------------ readers

def test_video_file_decodes_sampled_frames_in_order(tmp_path):
    path = _write_video(tmp_path / "clip.mp4")  # 24 frames @ 8 fps = 3 s -> 6 frames at 2 fps
    frames, sample_fps = read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == (6, *FRAME_HW, 3)
    assert FRAME_HW == smart_resize(H, W, 28, *frame_pixel_limits(6), variant="qwen_vl_utils")
    assert sample_fps == 2.0
    idx = frame_indices(24, 6).tolist()
    assert idx == [0, 5, 9, 14, 18, 23] and _colour_ids(frames) == idx
    # yuv420 coding moves a solid colour by a few levels, and nothing else
    assert np.abs(frames.astype(int) - PALETTE[idx][:, None, None].astype(int)).max() <= 8


def test_video_file_options_and_container_without_frame_count(tmp_path):
    path = _write_video(tmp_path / "clip.webm", n=20, fps=10, codec="libvpx-vp9")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # webm has no index: frames counted from packets
    frames, sample_fps = read_video(path, fps=4)  # 2 s at 4 fps -> 8 frames
    assert _colour_ids(frames) == frame_indices(20, 8).tolist() and sample_fps == pytest.approx(4.0)
    frames, sample_fps = read_video(path, nframes=5, max_pixels=28 * 28 * 64, min_pixels=28 * 28 * 16)
    assert frames.shape[0] == 4 and sample_fps == pytest.approx(4 / 20 * 10)
    assert _colour_ids(frames) == [0, 6, 13, 19]
    assert frames.shape[1] * frames.shape[2] <= 28 * 28 * 64 and frames.shape[1] % 28 == frames.shape[2] % 28 == 0


def test_frames_go_through_the_processor_unchanged(tmp_path):
    frames, sample_fps = read_video(_write_video(tmp_path / "clip.mp4"))
    pixel_values, grid_thw = preprocess_video(frames, min_pixels=3136, max_pixels=12845056)
    assert grid_thw.tolist() == [3, FRAME_HW[0] // 14, FRAME_HW[1] // 14]  # no resize: already 28-aligned
    assert pixel_values.shape == (3 * 20 * 28, 1176)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animated_image(tmp_path, suffix):
    path = tmp_path / f"anim{suffix}"
    frames = [_solid(i) for i in range(20)]
    extra = {"lossless": True} if suffix == ".webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **extra)  # 10 fps
    out, sample_fps = read_video(path)  # 2 s -> 4 frames
    assert out.shape == (4, *FRAME_HW, 3) and sample_fps == pytest.approx(2.0)
    idx = frame_indices(20, 4).tolist()
    assert idx == [0, 6, 13, 19]
    np.testing.assert_array_equal(out, np.broadcast_to(PALETTE[idx][:, None, None], out.shape))  # lossless


def test_frame_directory(tmp_path):
    for i in range(7):
        _solid(i).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames, sample_fps = read_video(tmp_path, fps=3.0)
    # a frame list is kept whole, an odd count padded with the last frame; sample_fps is `fps`
    assert frames.shape == (8, *FRAME_HW, 3) and sample_fps == 3.0
    assert _colour_ids(frames) == [0, 1, 2, 3, 4, 5, 6, 6]
    frames, sample_fps = read_video(tmp_path, fps=3.0, nframes=4)  # sampled at the native rate `fps`
    assert _colour_ids(frames) == [0, 2, 4, 6] and sample_fps == pytest.approx(4 / 7 * 3)


# ------------------------------------------------------------------------------------------- errors

def _assert_error(path, match, **kwargs):
    with pytest.raises(VideoLoadError, match=match) as info:
        read_video(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_errors_name_the_path(tmp_path):
    _assert_error(tmp_path / "missing.mp4", "no such file")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    _assert_error(tmp_path / "noise.mp4", "Invalid data")
    good = _write_video(tmp_path / "cut.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])  # the mp4 index comes last: now gone
    _assert_error(tmp_path / "cut.mp4", "cannot read video")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a" + bytes(10))
    _assert_error(tmp_path / "bad.gif", "cannot")
    (tmp_path / "clip.txt").write_text("hello")
    _assert_error(tmp_path / "clip.txt", "unsupported extension '.txt'")
    _solid(0).save(tmp_path / "still.gif")
    _assert_error(tmp_path / "still.gif", "too few frames")
    _assert_error(_write_video(tmp_path / "short.mp4", n=4), "too few frames", nframes=6)
    (tmp_path / "empty").mkdir()
    _assert_error(tmp_path / "empty", "no image frames")
    assert issubclass(VideoLoadError, ValueError)


def test_missing_pyav_says_how_to_install(tmp_path, monkeypatch):
    path = _write_video(tmp_path / "clip.mp4", n=4)
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(ImportError, match=r"pip install qwenvl_jax\[video\]"):
        read_video(path)


def test_second_per_grid_t():
    assert second_per_grid_t(2.0) == 1.0 and second_per_grid_t(0.5, temporal_patch_size=4) == 8.0
    assert math.isclose(second_per_grid_t(4 / 37 * 29.97), 2 / (4 / 37 * 29.97))


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_special_files_are_refused_not_read(tmp_path, kind):
    """A pipe, device or socket named like a video would block (or never end) if opened: refused by kind."""
    import os
    import socket

    path = tmp_path / "clip.mp4"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    with pytest.raises(VideoLoadError, match=r"clip.mp4.*not a regular file"):
        read_video(path)


@pytest.mark.parametrize("options,needle", [
    (dict(fps=0), "fps must be a positive number, got 0"),
    (dict(fps=float("nan")), "fps must be a positive number"),
    (dict(nframes=-2), "nframes must be a positive number"),
    (dict(total_pixels=float("inf")), "total_pixels must be a positive number"),
    (dict(min_pixels=50_000, max_pixels=20_000), "min_pixels (50000) must not exceed max_pixels (20000)"),
    (dict(min_frames=8, max_frames=4), "min_frames (8) must not exceed max_frames (4)"),
    (dict(video_start=-1), "video_start must be a number of seconds >= 0"),
    (dict(video_end=float("nan")), "video_end must be a number of seconds >= 0"),
    (dict(video_start=0.5, video_end=0.5), "video_start (0.5) must be before video_end (0.5)"),
    (dict(video_start=0.7, video_end=0.8), "holds fewer than 2 frames"),  # one frame at 4 fps
    (dict(min_pixels=10**9), "min_pixels must be at most"),
])
def test_bad_read_options_are_refused(tmp_path, options, needle):
    frames = [Image.new("RGB", (56, 56), (i * 40, 0, 0)) for i in range(4)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=250, loop=0)
    with pytest.raises(VideoLoadError, match=re.escape(needle)):
        read_video(gif, **options)


# ------------------------------------------------------------------------------ clips (video_start/end)

def _qwen_vl_utils_frame_range(total, fps, start=None, end=None):
    """qwen-vl-utils' calculate_video_frame_range (decord / torchcodec readers), transcribed."""
    if start is None and end is None:
        return 0, total - 1
    duration = total / fps
    first = math.ceil(max(0.0, min(start, duration)) * fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * fps), total - 1) if end is not None else total - 1
    if first >= last:
        raise ValueError("invalid time range")
    return first, last


def test_frame_indices_from_a_start_match_torch_linspace():
    for total in range(3, 90, 7):
        for start in range(0, total - 1, 3):
            for n in range(2, total - start + 1, 3):
                ref = torch.linspace(start, total - 1, n).round().long().numpy()
                np.testing.assert_array_equal(frame_indices(total, n, start), ref, err_msg=f"{total=} {start=} {n=}")


def test_clip_frame_range_matches_qwen_vl_utils():
    times = [None, 0.0, 0.1, 0.49, 0.5, 1.0, 1.26, 2.9, 3.0, 7.5]
    for total, fps in ((24, 8.0), (37, 29.97), (100, 12.5)):
        for start, end in itertools.product(times, times):
            try:
                expected = _qwen_vl_utils_frame_range(total, fps, start, end)
            except ValueError:
                with pytest.raises(ValueError, match="fewer than 2 frames"):
                    clip_frame_range(total, fps, start, end)
                continue
            assert clip_frame_range(total, fps, start, end) == expected, (total, fps, start, end)


@pytest.mark.parametrize("options", [dict(video_start=0.6, video_end=2.2), dict(video_start=1.3),
                                     dict(video_end=1.9, nframes=6), dict(video_start=0.3, fps=4, max_frames=8)])
def test_video_clip_samples_the_frames_qwen_vl_utils_samples(tmp_path, options):
    path = _write_video(tmp_path / "clip.mp4")  # 24 frames @ 8 fps
    first, last = _qwen_vl_utils_frame_range(24, 8.0, options.get("video_start"), options.get("video_end"))
    span = last - first + 1
    n = smart_nframes(span, 8.0, fps=options.get("fps", 2.0), nframes=options.get("nframes"),
                      max_frames=options.get("max_frames", 768))
    frames, sample_fps = read_video(path, **options)
    assert _colour_ids(frames) == torch.linspace(first, last, n).round().long().tolist()
    assert sample_fps == pytest.approx(n / span * 8.0)


def test_frame_directory_clip(tmp_path):
    for i in range(9):
        _solid(i).save(tmp_path / f"{i:02d}.png")
    frames, sample_fps = read_video(tmp_path, fps=2.0, video_start=1.0, video_end=3.5)  # frames 2..7, kept whole
    assert _colour_ids(frames) == [2, 3, 4, 5, 6, 7] and sample_fps == 2.0


def test_default_budgets_stay_within_the_video_pixel_limit():
    # qwen-vl-utils' defaults at every frame count it can sample: the largest (whole-pixel) frames fit
    assert max(n * math.floor(frame_pixel_limits(n)[1]) for n in range(2, 769, 2)) <= MAX_VIDEO_PIXELS


def test_a_video_whose_frames_pass_the_pixel_limit_is_refused_after_one_frame(tmp_path, monkeypatch):
    for i in range(40):
        _solid(i % len(PALETTE)).save(tmp_path / f"{i:02d}.png")
    frame = FRAME_HW[0] * FRAME_HW[1]  # each frame's size under the default budget
    monkeypatch.setattr(video_io, "MAX_VIDEO_PIXELS", 30 * frame)
    opened = []
    real = video_io.load_image
    monkeypatch.setattr(video_io, "load_image", lambda *a: opened.append(a) or real(*a))
    with pytest.raises(VideoLoadError, match=f"40 frames .* per-video limit of {30 * frame}"):
        read_video(tmp_path)
    assert len(opened) == 1  # refused from the first frame's size, before the rest are read
    frames, _ = read_video(tmp_path, nframes=30)
    assert frames.shape == (30, *FRAME_HW, 3)
