"""Image -> pixel_values [P, C*T*p*p] + grid_thw: SPEC sections 1.1-1.4.

Host side, numpy + PIL only. Reproduces transformers 5.x `Qwen2VLImageProcessorPil` bit for bit:
smart_resize -> PIL bicubic uint8 -> uint8 -> rescale (float64, cast to float32) -> normalize
(float32) -> patchify. The torchvision backend resizes differently (SPEC 1.2), so compare models on
identical pixel_values, not on images.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from qwenvl_jax.config import is_finite_number

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
VARIANTS = ("transformers", "qwen_vl_utils")


class ImageLoadError(ValueError):
    """An image that cannot be read or is not an RGB-convertible picture."""


# What one image may cost. Decoded: PIL's own bomb threshold (about 89M pixels), enforced as an error
# from the header size before decoding (PIL only warns up to twice that). Resized: a pixel budget
# (min_pixels / max_pixels) above 4x the released models' default max (16384 tokens) is refused
# before any resize, so a small file with a huge budget cannot be blown up to fill memory.
MAX_DECODED_PIXELS = 89_478_485
MAX_BUDGET_PIXELS = 4 * 12845056


def check_pixel_budget(min_pixels, max_pixels, where: str = "") -> None:
    """ValueError naming the problem unless 1 <= min_pixels <= max_pixels <= MAX_BUDGET_PIXELS."""
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if not is_finite_number(value) or not 1 <= value <= MAX_BUDGET_PIXELS:
            raise ValueError(f"{where}{name} must be a number in [1, {MAX_BUDGET_PIXELS}], got {value!r}")
    if min_pixels > max_pixels:
        raise ValueError(f"{where}min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")


def check_decoded_size(image: Image.Image, name) -> None:
    """From the header, before decoding: refuse an image that decompresses past MAX_DECODED_PIXELS."""
    if image.width * image.height > MAX_DECODED_PIXELS:
        raise ImageLoadError(f"cannot read image {name}: {image.width}x{image.height} pixels decompress past "
                             f"the {MAX_DECODED_PIXELS}-pixel limit")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                 max_pixels: int = 12845056, variant: str = "transformers") -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Python `round` (half to even) on purpose: (70, 98) -> (56, 112). The variants differ only in
    the clamps to `factor` (SPEC 1.1): qwen-vl-utils clamps after rounding, transformers after the
    max_pixels shrink.
    """
    if variant not in VARIANTS:
        raise ValueError(f"smart_resize variant must be one of {VARIANTS}, got {variant!r}")
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {height}x{width} has aspect ratio "
                         f"{max(height, width) / min(height, width):.1f}; at most 200 is supported")
    utils = variant == "qwen_vl_utils"
    lo = factor if utils else 0
    h_bar = max(lo, round(height / factor) * factor)
    w_bar = max(lo, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        lo = 0 if utils else factor
        h_bar = max(lo, math.floor(height / beta / factor) * factor)
        w_bar = max(lo, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb(image: Image.Image) -> Image.Image:
    # transformers 5.x convert_to_rgb: anything with alpha is composited onto white.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(f"image array must be uint8 [H, W], [H, W, 1|3|4]; got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] == 4:
        # transformers' numpy path blends in float and rounds (not PIL's integer alpha_composite).
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def load_image(src) -> Image.Image:
    """Path (str / Path), PIL image or uint8 array -> RGB PIL image.

    Files get their EXIF orientation applied (as transformers' `load_image` does); alpha is
    composited onto white for files too, as qwen-vl-utils does (transformers' path loader drops it).
    """
    if isinstance(src, Image.Image):
        return _to_rgb(src)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src)
    if not isinstance(src, (str, Path)):
        raise ImageLoadError(f"cannot read an image from {type(src).__name__}; pass a path, PIL image or uint8 array")
    path = Path(src)
    if not path.is_file():
        raise ImageLoadError(f"cannot read image {path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: the size check below makes it an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            check_decoded_size(image, path)
            image.load()  # decode now so truncated files fail here, not later
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except (ImageLoadError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types on damaged data: all mean "corrupt"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ImageLoadError(f"cannot read image {path}: {reason}") from None


def resize(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL bicubic (antialiased, uint8 -> uint8) -> [H, W, 3] uint8. A same-size resize is a copy."""
    return np.asarray(image.resize((width, height), resample=Image.Resampling.BICUBIC))


def normalize(pixels: np.ndarray, image_mean=CLIP_MEAN, image_std=CLIP_STD) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 [..., C, H, W]: (x/255 - mean)/std.

    Same rounding as transformers' PIL backend: the rescale in float64 cast to float32, then the
    normalize in float32 (the torchvision backend fuses both and differs by ~1 ulp).
    """
    x = (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
    x = (x - np.asarray(image_mean, np.float32)) / np.asarray(image_std, np.float32)
    return np.moveaxis(x, -1, -3)


def patchify(frames: np.ndarray, *, patch_size: int = 14, merge_size: int = 2,
             temporal_patch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """frames [F, C, H, W] -> (pixel_values [gt*gh*gw, C*T*p*p], grid_thw [3] int64); SPEC 1.4.

    Rows: temporal slice, then 2x2 merge blocks in raster order, then the 4 patches of a block.
    Features: c*T*p*p + t*p*p + py*p + px (a Conv3d weight's flattening). F is padded to a multiple
    of T by repeating the last frame, so one image becomes two identical frames.
    """
    f, c, h, w = frames.shape
    p, m, t = patch_size, merge_size, temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size = {p * m}")
    if f % t:
        frames = np.concatenate([frames, np.repeat(frames[-1:], t - f % t, axis=0)])
    gt, gh, gw = frames.shape[0] // t, h // p, w // p
    x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, T, p, p]
    return x.reshape(gt * gh * gw, c * t * p * p), np.array([gt, gh, gw], np.int64)


def preprocess_image(image, *, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                     temporal_patch_size: int = 2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                     raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (pixel_values float32 [gh*gw, 3*T*p*p], grid_thw int64 [3] = (1, gh, gw)).

    raw: uint8 patches, not normalized (the training pipeline normalizes on device: 4x less host
    memory and transfer).
    """
    image = load_image(image)
    h, w = smart_resize(image.height, image.width, patch_size * merge_size, min_pixels, max_pixels)
    pixels = resize(image, h, w)
    frames = (np.moveaxis(pixels, -1, -3) if raw else normalize(pixels, image_mean, image_std))[None]  # [1, 3, H, W]
    return patchify(frames, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
