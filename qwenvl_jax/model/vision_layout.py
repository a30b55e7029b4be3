"""Host-side geometry of the vision sequence (numpy): window order, rotary ids, segment ids.

Everything that depends only on the grids (t, h, w) is computed here once per batch, so the
jitted tower sees plain index arrays (SPEC 3.2, 3.3, 3.6).
"""

from __future__ import annotations

import numpy as np
from flax import struct

from qwenvl_jax.config import VisionConfig


@struct.dataclass
class VisionInputs:
    """Inputs of the vision tower. Sequence arrays are in window order, patch level (P rows)."""

    pixel_values: np.ndarray  # [P, patch_dim] in the processor's (raster, 2x2-block) order
    rotary_pos: np.ndarray  # [P, 2] (row, col) of each patch, window order
    window_index: np.ndarray  # [P/4] window order -> source merge unit
    reverse_index: np.ndarray  # [P/4] source merge unit -> window order (argsort of window_index)
    window_segment_ids: np.ndarray  # [P] one id per window, 1-based
    full_segment_ids: np.ndarray  # [P] one id per (item, temporal slice), 1-based
    max_window_len: int = struct.field(pytree_node=False)  # static bounds for banded attention
    max_full_len: int = struct.field(pytree_node=False)
    num_image_tokens: int = struct.field(pytree_node=False)  # merged rows that belong to images

    @property
    def num_tokens(self) -> int:
        return self.reverse_index.shape[0]


def rotary_positions(grid_thw, merge: int) -> np.ndarray:
    """(row, col) of every patch in the processor's order: 2x2 blocks in raster order. [P, 2]."""
    out = []
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()  # noqa: E731
        out.append(np.tile(np.stack([block(rows), block(cols)], -1), (t, 1)))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def window_index(grid_thw, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Merge-unit permutation into window order and the window length (in patches) of each unit.

    Windows are vw x vw merge units (vw = window_size / (patch * merge)), tiled from the top-left;
    edge windows are partial. Order: per item, temporal slice, window row, window col, then
    raster inside the window. Returns (index [P/4], window_len_of_unit [P/4]).
    """
    m = cfg.spatial_merge_size
    vw = cfg.window_size // (cfg.patch_size * m)
    index, unit_window, offset, window_id = [], [], 0, 0
    for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist():
        lh, lw = h // m, w // m
        nh, nw = -(-lh // vw), -(-lw // vw)
        ids = np.full((t, nh * vw, nw * vw), -1, np.int64)
        ids[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw) + offset
        ids = ids.reshape(t, nh, vw, nw, vw).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, vw * vw)
        for win in ids:
            valid = win[win >= 0]
            if valid.size:
                index.append(valid)
                unit_window.append(np.full(valid.size, window_id))
                window_id += 1
        offset += t * lh * lw
    if not index:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    return np.concatenate(index), np.concatenate(unit_window)


def vision_inputs(pixel_values, grid_thw, cfg: VisionConfig, num_image_items: int | None = None
                  ) -> VisionInputs:
    """Builds VisionInputs for the items of `grid_thw` (images first, then videos).

    num_image_items: how many leading grids are images (the rest are videos); their merged
    tokens come first in the output and fill the image placeholders.
    """
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    mu = cfg.merge_unit
    num_patches = int(np.prod(grid_thw, axis=1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (num_patches, cfg.patch_dim):
        raise ValueError(f"pixel values have shape {pixel_values.shape} but the grids {grid_thw.tolist()} "
                         f"need ({num_patches}, {cfg.patch_dim})")
    m = cfg.spatial_merge_size
    bad = [g for g in grid_thw.tolist() if g[1] % m or g[2] % m or min(g) <= 0]
    if bad:
        raise ValueError(f"grid_thw {bad}: h and w must be positive multiples of {m}")

    index, unit_window = window_index(grid_thw, cfg)
    to_window = lambda a: a.reshape(num_patches // mu, mu, *a.shape[1:])[index].reshape(a.shape)  # noqa: E731
    window_seg = np.repeat(unit_window, mu) + 1
    slice_sizes = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    # Units of a temporal slice stay contiguous in window order, so per-slice ids keep their order.
    full_seg = np.repeat(np.arange(len(slice_sizes)), slice_sizes) + 1
    n_img = len(grid_thw) if num_image_items is None else num_image_items
    return VisionInputs(
        pixel_values=pixel_values,
        rotary_pos=to_window(rotary_positions(grid_thw, m)).astype(np.int32),
        window_index=index.astype(np.int32),
        reverse_index=np.argsort(index).astype(np.int32),
        window_segment_ids=window_seg.astype(np.int32),
        full_segment_ids=full_seg.astype(np.int32),
        max_window_len=cfg.window_patches,
        max_full_len=int(slice_sizes.max()),
        num_image_tokens=int(np.prod(grid_thw[:n_img], axis=1).sum()) // mu,
    )
