"""Image and video preprocessing against transformers' PIL image processor and SPEC 1.1 / 1.4.

pixel_values must equal transformers 5.x `Qwen2VLImageProcessorPil` to max abs diff <= 1e-6 (in
practice they are bit-identical); the patch layout is checked against an index formula written
from SPEC 1.4, independent of the reshape/transpose in the code.
"""

import re

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwenvl_jax.processing.image import ImageLoadError, load_image, patchify, preprocess_image, smart_resize
from qwenvl_jax.processing.video import preprocess_video

TOL = 1e-6  # max abs diff against transformers' float32 pixel_values
MIN_PX = 3136


def _noise(h, w, c=3, seed=0):
    shape = (h, w) if c == 1 else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# ------------------------------------------------------------------------------------ smart_resize

SPEC_EXAMPLES = [  # SPEC 1.1, default checkpoint limits; both variants agree on these
    ((768, 1024), (756, 1036)), ((70, 98), (56, 112)), ((10, 10), (56, 56)),
    ((1, 30), (28, 308)), ((4000, 30), (4004, 28)), ((2000, 3000), (1988, 2996)),
]


@pytest.mark.parametrize("variant", ["transformers", "qwen_vl_utils"])
@pytest.mark.parametrize("size,expected", SPEC_EXAMPLES)
def test_smart_resize_spec_examples(size, expected, variant):
    assert smart_resize(*size, variant=variant) == expected


def test_smart_resize_variants_differ_only_in_clamps():
    # Shrinking 20x3000 to ~6272 px: transformers clamps the short side to 28, qwen-vl-utils gives 0.
    assert smart_resize(20, 3000, max_pixels=6272) == (28, 952)
    assert smart_resize(20, 3000, max_pixels=6272, variant="qwen_vl_utils") == (0, 952)


def test_smart_resize_matches_transformers_grid():
    sides = [1, 5, 13, 14, 27, 28, 29, 42, 55, 56, 70, 98, 111, 224, 333, 500, 767, 1000, 1023, 2048, 4000]
    limits = [(3136, 12845056), (3136, 1003520), (100352, 602112), (3136, 50176)]
    n = 0
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in limits:
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
                n += 1
    assert n > 1000


def test_smart_resize_rejects_aspect_ratio_over_200():
    assert smart_resize(1, 200) == (28, 812)
    with pytest.raises(ValueError, match="1x201"):
        smart_resize(1, 201)
    with pytest.raises(ValueError, match="201x1"):
        smart_resize(201, 1, variant="qwen_vl_utils")


# ------------------------------------------------------------------------------------ pixel_values

CASES = {  # name -> (PIL image, max_pixels)
    "tiny_10x10": (lambda: Image.fromarray(_noise(10, 10)), 50176),
    "odd_37x53": (lambda: Image.fromarray(_noise(37, 53, seed=1)), 50176),
    "photo_768x1024": (lambda: Image.fromarray(_noise(768, 1024, seed=2)), 1003520),
    "huge_3000x4000_capped": (lambda: Image.fromarray(_noise(3000, 4000, seed=3)), 200704),
    "thin_1x30": (lambda: Image.fromarray(_noise(1, 30, seed=4)), 50176),
    "tall_4000x30": (lambda: Image.fromarray(_noise(4000, 30, seed=5)), 200704),
    "wide_25x3000_capped": (lambda: Image.fromarray(_noise(25, 3000, seed=6)), 50176),
    "rgba": (lambda: Image.fromarray(_noise(61, 90, 4, seed=7), "RGBA"), 50176),
    "greyscale": (lambda: Image.fromarray(_noise(90, 61, 1, seed=8), "L"), 50176),
    "grey_alpha": (lambda: Image.fromarray(_noise(50, 70, 4, seed=9), "RGBA").convert("LA"), 50176),
    "palette_transparency": (lambda: _palette_with_transparency(), 50176),
}


def _palette_with_transparency():
    image = Image.fromarray(_noise(64, 48, seed=10)).quantize(16)
    image.info["transparency"] = 3
    return image


def _hf(images, max_pixels, min_pixels=MIN_PX):
    ref = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=images, return_tensors="np")
    return ref["pixel_values"], ref["image_grid_thw"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_pixel_values_match_transformers_pil(name):
    make, max_pixels = CASES[name]
    image = make()
    ref_pv, ref_grid = _hf([image], max_pixels)
    pv, grid = preprocess_image(image, min_pixels=MIN_PX, max_pixels=max_pixels)
    assert grid.dtype == np.int64 and grid.tolist() == ref_grid[0].tolist()
    assert pv.dtype == np.float32 and pv.shape == ref_pv.shape == (int(grid.prod()), 1176)
    assert np.abs(pv - ref_pv).max() <= TOL


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_numpy_input_matches_transformers(channels):
    array = _noise(45, 67, channels, seed=11).reshape(45, 67, channels)
    ref_pv, ref_grid = _hf([array], 50176)
    pv, grid = preprocess_image(array, min_pixels=MIN_PX, max_pixels=50176)
    assert grid.tolist() == ref_grid[0].tolist()
    assert np.abs(pv - ref_pv).max() <= TOL


def test_file_input_equals_pil_input(tmp_path):
    image = Image.fromarray(_noise(40, 50, 4, seed=12), "RGBA")
    image.save(tmp_path / "a.png")
    from_file = preprocess_image(tmp_path / "a.png", min_pixels=MIN_PX, max_pixels=50176)
    from_pil = preprocess_image(image, min_pixels=MIN_PX, max_pixels=50176)
    assert np.array_equal(from_file[0], from_pil[0]) and np.array_equal(from_file[1], from_pil[1])
    assert load_image(str(tmp_path / "a.png")).mode == "RGB"


# ------------------------------------------------------------------------------------ layout (SPEC 1.4)

def _spec_layout(frames):
    """pixel_values[row, feature] from SPEC 1.4 by index arithmetic: rows (gt, bi, bj, di, dj),
    features c*392 + t*196 + py*14 + px, frame 2*gt+t (the last frame repeated past the end)."""
    f, c, h, w = frames.shape
    gt, gh, gw = -(-f // 2), h // 14, w // 14
    t_, bi, bj, di, dj, ch, tt, py, px = np.indices((gt, gh // 2, gw // 2, 2, 2, c, 2, 14, 14), sparse=True)
    value = frames[np.minimum(2 * t_ + tt, f - 1), ch, (2 * bi + di) * 14 + py, (2 * bj + dj) * 14 + px]
    return value.reshape(gt * gh * gw, c * 2 * 14 * 14), [gt, gh, gw]


@pytest.mark.parametrize("n_frames", [1, 2, 5])
def test_patchify_layout_matches_spec(n_frames):
    frames = np.random.default_rng(n_frames).standard_normal((n_frames, 3, 56, 84)).astype(np.float32)
    pv, grid = patchify(frames, patch_size=14, merge_size=2, temporal_patch_size=2)
    expected, expected_grid = _spec_layout(frames)
    assert grid.tolist() == expected_grid
    assert np.array_equal(pv, expected)
    # Four consecutive rows are one 2x2 merge block: row 1 is the patch right of row 0.
    assert np.array_equal(pv[1, :196], frames[0, 0, :14, 14:28].ravel())


def test_video_odd_frame_count_repeats_last_frame():
    frames = [_noise(60, 80, seed=s) for s in range(3)]
    pv, grid = preprocess_video(frames, min_pixels=MIN_PX, max_pixels=50176)
    assert grid.tolist() == [2, 4, 6]
    last = pv[24:].reshape(24, 3, 2, 196)  # second temporal patch: frames 2 and 2 (repeated)
    assert np.array_equal(last[:, :, 0], last[:, :, 1])
    first = pv[:24].reshape(24, 3, 2, 196)
    assert not np.array_equal(first[:, :, 0], first[:, :, 1])


def test_video_layout_and_frame_forms_agree():
    frames = np.stack([_noise(60, 80, seed=s) for s in range(4)])  # [F, H, W, 3]
    pv, grid = preprocess_video(frames, min_pixels=MIN_PX, max_pixels=50176)
    as_list, _ = preprocess_video([Image.fromarray(f) for f in frames], min_pixels=MIN_PX, max_pixels=50176)
    assert np.array_equal(pv, as_list)
    # Each frame alone through the image path gives the frames the video path patchified.
    per_frame = np.stack([_spec_image(f) for f in frames])  # [F, 3, H, W]
    expected, expected_grid = _spec_layout(per_frame)
    assert grid.tolist() == expected_grid == [2, 4, 6]
    assert np.array_equal(pv, expected)


def _spec_image(array):
    # normalized [3, H, W] of one frame, recovered from the image path's t=0 slice
    pv, (_, gh, gw) = preprocess_image(array, min_pixels=MIN_PX, max_pixels=50176)
    x = pv.reshape(gh // 2, gw // 2, 2, 2, 3, 2, 14, 14)[:, :, :, :, :, 0]
    return x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * 14, gw * 14)


def test_video_frames_take_first_frame_size():
    frames = [_noise(60, 80, seed=0), _noise(90, 40, seed=1)]
    _, grid = preprocess_video(frames, min_pixels=MIN_PX, max_pixels=50176)
    assert grid.tolist() == [1, 4, 6]


def test_two_identical_frames_equal_the_image_path():
    image = _noise(75, 110, seed=13)
    video_pv, video_grid = preprocess_video([image, image], min_pixels=MIN_PX, max_pixels=50176)
    image_pv, image_grid = preprocess_image(image, min_pixels=MIN_PX, max_pixels=50176)
    assert video_grid.tolist() == image_grid.tolist()
    assert np.array_equal(video_pv, image_pv)


# ------------------------------------------------------------------------------------ bad input

def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match="nope.jpg") as e:
        preprocess_image(path, min_pixels=MIN_PX, max_pixels=50176)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_file_names_the_path_and_reason(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "garbage":
        path.write_bytes(b"this is not an image at all")
    else:
        Image.fromarray(_noise(64, 64)).save(path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageLoadError) as e:
        load_image(str(path))
    message = str(e.value)
    assert str(path) in message and "\n" not in message and len(message) > len(str(path)) + 20


def test_bad_array_is_rejected():
    with pytest.raises(ImageLoadError, match="uint8"):
        load_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageLoadError, match="PIL image"):
        load_image(3.14)


def _png_header(path, width, height):
    """A PNG whose header claims width x height (its pixel data is missing): tiny on disk."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)  # far less than the header promises
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(10_000, 9_000), (30_000, 30_000), (100_000, 1_000)])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, size):
    """Past MAX_DECODED_PIXELS (PIL only warns below twice its limit): an error before decoding."""
    from qwenvl_jax.processing.image import MAX_DECODED_PIXELS, ImageLoadError, load_image

    assert size[0] * size[1] > MAX_DECODED_PIXELS
    _png_header(tmp_path / "bomb.png", *size)
    with pytest.raises(ImageLoadError, match=r"bomb.png: .*(pixels decompress past|exceeds limit)"):
        load_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("budget,needle", [
    (dict(min_pixels=10**10), "min_pixels must be a number in"),
    (dict(max_pixels=10**12), "max_pixels must be a number in"),
    (dict(min_pixels=5000, max_pixels=4000), "min_pixels (5000) must not exceed max_pixels (4000)"),
    (dict(max_pixels=float("nan")), "max_pixels must be a number in"),
])
def test_pixel_budgets_are_checked_before_resizing(budget, needle):
    from qwenvl_jax.processing.image import check_pixel_budget

    with pytest.raises(ValueError, match=re.escape(needle)):
        check_pixel_budget(budget.get("min_pixels", 3136), budget.get("max_pixels", 12845056))
