"""Host-side geometry of the vision sequence (numpy): window order, rotary ids, segment ids.

Everything that depends only on the grids (t, h, w) is computed here once per batch, so the
jitted tower sees plain index arrays (SPEC 3.2, 3.3, 3.6).
"""

from __future__ import annotations

import numpy as np
from flax import struct

from qwenvl_jax.buckets import bucket
from qwenvl_jax.config import VisionConfig


@struct.dataclass
class VisionInputs:
    """Inputs of the vision tower.

    The tower runs on a *slot* sequence: merge units in window order, each window padded to
    `window_len` patches (padding slots hold zeros and segment id 0), so windowed attention is
    exact block-diagonal attention over aligned blocks. S = number of slots (patch level).
    """

    pixel_values: np.ndarray  # [P, patch_dim] in the processor's (raster, 2x2-block) order
    unit_index: np.ndarray  # [S/4] source merge unit of each slot unit; U (one past the end) = padding
    reverse_index: np.ndarray  # [U] slot unit of each source merge unit
    rotary_pos: np.ndarray  # [S, 2] (row, col) of each slot's patch
    window_segment_ids: np.ndarray  # [S] one id per window, 1-based; 0 = padding
    full_segment_ids: np.ndarray  # [S] one id per (item, temporal slice), 1-based; 0 = padding
    window_len: int = struct.field(pytree_node=False)  # patches per padded window (static)
    max_full_len: int = struct.field(pytree_node=False)  # bound on the slot span of one temporal slice

    @property
    def num_tokens(self) -> int:
        return self.reverse_index.shape[-1]


def pad_row(vi: VisionInputs, patches: int, slots: int, merge_unit: int = 4) -> dict[str, np.ndarray]:
    """One row's arrays padded to `patches` patches and `slots` slots. Padding patches are zeros,
    padding slots have segment id 0, padding units point at the last slot; the model never reads
    their outputs."""
    u = patches // merge_unit
    units = vi.reverse_index.shape[0]
    if vi.pixel_values.shape[0] > patches or vi.window_segment_ids.shape[0] > slots:
        raise ValueError(f"vision row needs {vi.pixel_values.shape[0]} patches / {vi.window_segment_ids.shape[0]} "
                         f"slots, over the budget {patches} / {slots}")

    def pad(x, n, fill=0):
        return np.concatenate([x, np.full((n - x.shape[0], *x.shape[1:]), fill, x.dtype)])

    unit_index = np.where(vi.unit_index >= units, u, vi.unit_index).astype(np.int32)  # padding unit: past the end
    return dict(pixel_values=pad(vi.pixel_values, patches), unit_index=pad(unit_index, slots // merge_unit, u),
                reverse_index=pad(vi.reverse_index, u, slots // merge_unit - 1), rotary_pos=pad(vi.rotary_pos, slots),
                window_segment_ids=pad(vi.window_segment_ids, slots), full_segment_ids=pad(vi.full_segment_ids, slots))


def stack_rows(rows: list[VisionInputs], patches: int | None = None, slots: int | None = None,
               merge_unit: int = 4) -> VisionInputs:
    """Stacks per-row layouts into the model's batched form (leading row axis R), padded to
    `patches` patches and `slots` slots per row (default: the largest row; see pad_row). With
    fixed budgets (packed training) shapes and the static max_full_len (the slot budget) never
    change between batches."""
    p = max([r.pixel_values.shape[0] for r in rows] + [patches or 0])
    s = max([r.window_segment_ids.shape[0] for r in rows] + [slots or 0])
    out = [pad_row(r, p, s, merge_unit) for r in rows]
    arrays = {k: np.stack([o[k] for o in out]) for k in out[0]}
    max_full = s if slots is not None else max(r.max_full_len for r in rows)
    return VisionInputs(**arrays, window_len=rows[0].window_len, max_full_len=max_full)


def bucket_rows(vision: VisionInputs, merge_unit: int = 4) -> VisionInputs:
    """Pads batched rows to bucketed patch / slot counts (4 sizes per octave) and buckets the
    static max_full_len, so images of new sizes rarely mean a new compile (generation, eval)."""
    rows = [VisionInputs(**{k: getattr(vision, k)[i] for k in _ARRAYS}, window_len=vision.window_len,
                         max_full_len=vision.max_full_len) for i in range(vision.pixel_values.shape[0])]
    w = vision.window_len
    patches = -(-bucket(vision.pixel_values.shape[1], 64) // merge_unit) * merge_unit
    slots = -(-bucket(vision.window_segment_ids.shape[1], w) // w) * w
    out = stack_rows(rows, patches=patches, slots=slots, merge_unit=merge_unit)
    return out.replace(max_full_len=min(bucket(vision.max_full_len, w), slots))


_ARRAYS = ("pixel_values", "unit_index", "reverse_index", "rotary_pos", "window_segment_ids", "full_segment_ids")


def empty_row(cfg: VisionConfig) -> VisionInputs:
    """A row without images or videos (all padding), for packed batches."""
    return VisionInputs(pixel_values=np.zeros((0, cfg.patch_dim), np.float32), unit_index=np.zeros((0,), np.int32),
                        reverse_index=np.zeros((0,), np.int32), rotary_pos=np.zeros((0, 2), np.int32),
                        window_segment_ids=np.zeros((0,), np.int32), full_segment_ids=np.zeros((0,), np.int32),
                        window_len=cfg.window_patches, max_full_len=1)


def token_index(input_ids: np.ndarray, image_token_id: int, video_token_id: int, num_image_units: int) -> np.ndarray:
    """[B, L] index of the vision feature each placeholder token takes (-1 for other tokens):
    image placeholders take the image features in order, video placeholders the video features
    after them, both counted row-major over the batch (as transformers' masked_scatter does)."""
    flat = np.asarray(input_ids).reshape(-1)
    is_img, is_vid = flat == image_token_id, flat == video_token_id
    idx = np.where(is_img, np.cumsum(is_img) - 1, np.where(is_vid, np.cumsum(is_vid) - 1 + num_image_units, -1))
    return idx.reshape(np.shape(input_ids)).astype(np.int32)


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


def vision_inputs(pixel_values, grid_thw, cfg: VisionConfig) -> VisionInputs:
    """Builds one row's VisionInputs for the items of `grid_thw`; the tower's output has each
    item's merged tokens in this order (raster order inside an item)."""
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
    units = num_patches // mu
    window_units = cfg.window_patches // mu
    # Slot of each unit in window order: its window's start plus its rank inside the window.
    starts = np.flatnonzero(np.r_[True, unit_window[1:] != unit_window[:-1]])
    rank = np.arange(units) - np.repeat(starts, np.diff(np.r_[starts, units]))
    slot = unit_window * window_units + rank
    n_slots = (int(unit_window[-1]) + 1) * window_units
    unit_index = np.full(n_slots, units, np.int64)
    unit_index[slot] = index
    reverse_index = np.empty(units, np.int64)
    reverse_index[index] = slot

    def to_slots(per_unit, fill):  # [U, ...] in source order -> [S, ...] patch level
        out = np.full((n_slots + 1, *per_unit.shape[1:]), fill, per_unit.dtype)
        out[:units] = per_unit
        return np.repeat(out[unit_index], mu, axis=0) if per_unit.ndim == 1 else out[unit_index]

    rot = rotary_positions(grid_thw, m).reshape(units, mu, 2)
    slice_sizes = np.repeat(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    slice_of_unit = np.repeat(np.arange(len(slice_sizes)), slice_sizes // mu) + 1
    full_seg = to_slots(slice_of_unit, 0)
    window_seg = np.repeat(np.arange(n_slots // window_units) + 1, cfg.window_patches)
    window_seg[full_seg == 0] = 0
    # Units of a temporal slice stay contiguous in window order (padding aside): span per slice.
    pos = np.arange(len(full_seg))  # patch-level slots
    first = np.full(len(slice_sizes) + 1, len(pos))
    last = np.zeros(len(slice_sizes) + 1, np.int64)
    np.minimum.at(first, full_seg, pos)
    np.maximum.at(last, full_seg, pos)
    return VisionInputs(
        pixel_values=pixel_values,
        unit_index=unit_index.astype(np.int32),
        reverse_index=reverse_index.astype(np.int32),
        rotary_pos=to_slots(rot, 0).reshape(-1, 2).astype(np.int32),
        window_segment_ids=window_seg.astype(np.int32),
        full_segment_ids=full_seg.astype(np.int32),
        window_len=cfg.window_patches,
        max_full_len=int((last[1:] - first[1:]).max()) + 1,
    )
