"""Video frames -> pixel_values_videos [P, C*T*p*p] + grid_thw: SPEC sections 1.4 and 2.2.

Decoded frames in, as transformers' video processor takes them: every frame is resized to the one
smart_resize size of the first frame (transformers variant), with PIL bicubic (the torchvision
reference differs by a few uint8 units, SPEC 1.2), normalized like images, then patchified with
frame pairs as temporal patches. Reading files and fps-based sampling live elsewhere.
"""

from __future__ import annotations

import numpy as np

from qwenvl_jax.processing.image import CLIP_MEAN, CLIP_STD, load_image, normalize, patchify, resize, smart_resize


def preprocess_video(frames, *, min_pixels: int, max_pixels: int, patch_size: int = 14, merge_size: int = 2,
                     temporal_patch_size: int = 2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                     raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """frames: list of PIL images / uint8 [H, W, 3] arrays, or uint8 [F, H, W, 3]. raw: uint8 patches.

    Returns (pixel_values_videos float32 [gt*gh*gw, 3*T*p*p], grid_thw int64 [3] = (gt, gh, gw)),
    gt = ceil(F / T): an odd frame count repeats the last frame.
    """
    images = [load_image(f) for f in frames]
    if not images:
        raise ValueError("a video needs at least one frame")
    h, w = smart_resize(images[0].height, images[0].width, patch_size * merge_size, min_pixels, max_pixels)
    pixels = np.stack([resize(im, h, w) for im in images])  # [F, H, W, 3] uint8
    frames = np.moveaxis(pixels, -1, -3) if raw else normalize(pixels, image_mean, image_std)
    return patchify(frames, patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size)
