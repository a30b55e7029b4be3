"""A media part's own keys in training records, as qwen-vl-utils' fetch_image / fetch_video read them:
each image and video is sized and sampled by its own keys (over the data config's), frames are
resized once; a bad key, alone or against the data config, is a counted bad_format skip naming it."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.formats import MEDIA_OPTIONS, REASONS, DataError, parse_record
from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder
from qwenvl_jax.data.sources import open_media
from qwenvl_jax.processing.image import smart_resize
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.processing.video_io import frame_pixel_limits

PALETTE = np.array(list(itertools.product((0, 128, 255), repeat=3)), np.uint8)
GIF_FPS, GIF_FRAMES, GIF_HW = 10.0, 12, (56, 84)  # GIF durations are whole centiseconds


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(root / "a.png")
    frames = [Image.new("RGB", GIF_HW[::-1], tuple(int(v) for v in PALETTE[i])) for i in range(GIF_FRAMES)]
    frames[0].save(root / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return root


@pytest.fixture(scope="module")
def encoder_for(chat_checkpoint, media_root):
    processor = Processor.from_pretrained(chat_checkpoint[0])
    # a released checkpoint's video limits (wide): the frames read_video sizes pass unchanged
    processor.video_min_pixels, processor.video_max_pixels = 3136, 12845056
    config = Qwen25VLConfig.from_hf_file(chat_checkpoint[0])

    def make(on_bad_sample="raise", **data):
        data = DataConfig(seq_len=4096, patch_budget=8192, max_items=8, batch_size=1, shuffle=False,
                          on_bad_sample=on_bad_sample, **data)
        return SampleEncoder(processor, config, data, data_root=media_root)
    return make


def _record(*parts):
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": "Noise."}]}


def _colour_ids(frames):
    means = frames.reshape(len(frames), -1, 3).mean(1)
    return np.abs(means[:, None] - PALETTE[None].astype(float)).sum(-1).argmin(1).tolist()


def test_each_image_is_sized_by_its_own_budget_as_hf_sizes_it(encoder_for, media_root):
    own = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)
    record = _record({"type": "image", "image": "a.png", **own}, {"type": "image", "image": "a.png"},
                     {"type": "image", "image": "a.png", "max_pixels": 28 * 28 * 8})
    data_max = 28 * 28 * 40
    sample = encoder_for(max_pixels=data_max).encode(json.dumps(record))
    image = Image.open(media_root / "a.png")
    expected = [Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(image, return_tensors="np")["image_grid_thw"][0]
                for lo, hi in ((own["min_pixels"], own["max_pixels"]), (3136, data_max), (3136, 28 * 28 * 8))]
    np.testing.assert_array_equal(sample["grids"], np.stack(expected))
    assert len({tuple(g) for g in sample["grids"].tolist()}) == 3  # three budgets, three sizes


def _qwen_vl_utils_indices(start, end, nframes=None, fps=2.0):
    """Frames qwen-vl-utils' decord reader takes (calculate_video_frame_range, smart_nframes, linspace)."""
    duration = GIF_FRAMES / GIF_FPS
    first = math.ceil(max(0.0, min(start, duration)) * GIF_FPS) if start is not None else 0
    last = GIF_FRAMES - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, duration)) * GIF_FPS), last)
    span = last - first + 1
    if nframes is not None:
        n = round(nframes / 2) * 2
    else:
        n = math.floor(min(max(span / GIF_FPS * fps, 4), span) / 2) * 2
    return torch.linspace(first, last, n).round().long().tolist(), n / span * GIF_FPS


@pytest.mark.parametrize("own", [dict(video_start=0.3, video_end=1.0, nframes=4), dict(video_start=0.5),
                                 dict(video_end=1.2, fps=4.0), dict(nframes=6, max_pixels=28 * 28 * 6),
                                 dict(fps=8.0, min_pixels=28 * 28 * 2, total_pixels=28 * 28 * 40)])
def test_each_video_is_sampled_and_sized_by_its_own_keys(encoder_for, media_root, own):
    record = _record({"type": "video", "video": "clip.gif", **own})
    media = open_media(parse_record(record, media_root), fps=2.0)
    indices, sample_fps = _qwen_vl_utils_indices(own.get("video_start"), own.get("video_end"), own.get("nframes"),
                                                 own.get("fps", 2.0))
    frames = media.videos[0]
    assert _colour_ids(frames) == indices and media.fps[0] == pytest.approx(sample_fps)
    n = len(indices)
    # qwen-vl-utils' size: the per-frame share of total_pixels, max_pixels only lowering it
    lo, hi = frame_pixel_limits(n, min_pixels=own.get("min_pixels"), max_pixels=own.get("max_pixels"),
                                total_pixels=own.get("total_pixels"))
    size = smart_resize(*GIF_HW, 28, lo, hi, variant="qwen_vl_utils")
    assert frames.shape == (n, *size, 3)
    sample = encoder_for().encode(json.dumps(record))  # through the processor: resized no further
    np.testing.assert_array_equal(sample["grids"], [[n // 2, size[0] // 14, size[1] // 14]])


def test_data_budget_sizes_frames_once(encoder_for, media_root):
    data_max = 28 * 28 * 30
    record = _record({"type": "video", "video": "clip.gif"})
    sample = encoder_for(max_pixels=data_max).encode(json.dumps(record))
    n = len(_qwen_vl_utils_indices(None, None)[0])
    size = smart_resize(*GIF_HW, 28, *frame_pixel_limits(n, max_pixels=data_max), variant="qwen_vl_utils")
    np.testing.assert_array_equal(sample["grids"], [[n // 2, size[0] // 14, size[1] // 14]])


BAD_VALUES = [-1, "3", True, [4], {"a": 1}, float("nan"), float("inf"), 10**400]


def _bad_cases():
    for kind, keys in MEDIA_OPTIONS.items():
        for key in keys:
            for value in BAD_VALUES + ([] if key.startswith("video_") else [0]):
                yield kind, {key: value}, key
    yield "image", dict(min_pixels=5000, max_pixels=4000), "min_pixels (5000) must not exceed max_pixels (4000)"
    yield "image", dict(max_pixels=10**9), "max_pixels must be a number in"
    yield "video", dict(min_pixels=5000, max_pixels=4000), "min_pixels (5000) must not exceed max_pixels (4000)"
    yield "video", dict(min_pixels=10**9), "min_pixels must be at most"
    yield "video", dict(min_frames=8, max_frames=4), "min_frames (8) must not exceed max_frames (4)"
    yield "video", dict(video_start=2.0, video_end=1.0), "video_start (2.0) must be before video_end (1.0)"
    yield "video", dict(fps=2.0, nframes=4), "fps or nframes, not both"
    for kind in MEDIA_OPTIONS:
        yield kind, dict(resized_height=280, resized_width=280), "resized_height/resized_width not supported"


@pytest.mark.parametrize("kind,own,needle", list(_bad_cases()))
def test_a_bad_key_is_a_bad_format_record_naming_it(media_root, kind, own, needle):
    ref = "a.png" if kind == "image" else "clip.gif"
    record = json.loads(json.dumps(_record({"type": kind, kind: ref, **own})))  # as read from a JSONL line
    with pytest.raises(DataError) as info:
        parse_record(record, media_root)
    assert info.value.reason == "bad_format" and needle in str(info.value)
    assert "messages[0].content[0]" in str(info.value)


@pytest.mark.parametrize("kind,own,data", [
    ("image", dict(max_pixels=28 * 28 * 4), dict(min_pixels=28 * 28 * 8)),
    ("video", dict(min_pixels=28 * 28 * 20), dict(max_pixels=28 * 28 * 10)),
    ("video", dict(video_start=1.3, video_end=1.4), {}),  # both past the end of the 1.2 s clip
])
def test_keys_that_clash_with_the_data_config_or_the_file_skip_the_record(encoder_for, kind, own, data):
    ref = "a.png" if kind == "image" else "clip.gif"
    sample = encoder_for(on_bad_sample="skip", **data)(json.dumps(_record({"type": kind, kind: ref, **own})))
    assert sample["skips"].tolist() == [REASONS.index("bad_format") + 1] and len(sample["input_ids"]) == 0


def test_random_media_keys_end_in_a_sample_or_a_bad_format_skip(encoder_for):
    """Property: any mix of keys and values (good, bad, clashing) encodes or is a bad_format skip."""
    import random

    rng = random.Random(0)
    values = [None, 1, 2, 3, 0.5, 1.1, 28 * 28 * 4, 28 * 28 * 30, 0, -1, float("nan"), 10**400, "2", True, [1]]
    encoder = encoder_for(on_bad_sample="skip", max_pixels=28 * 28 * 30)
    outcomes = {"sample": 0, "skip": 0}
    for _ in range(150):
        kind = rng.choice(["image", "video"])
        own = {k: rng.choice(values) for k in rng.sample(MEDIA_OPTIONS[kind], rng.randint(1, len(MEDIA_OPTIONS[kind])))}
        line = json.dumps(_record({"type": kind, kind: "a.png" if kind == "image" else "clip.gif", **own}))
        sample = encoder(line)
        if len(sample["skips"]):
            assert sample["skips"].tolist() == [REASONS.index("bad_format") + 1], own
            outcomes["skip"] += 1
        else:
            outcomes["sample"] += 1
    assert min(outcomes.values()) > 10, outcomes
