"""Host-side preparation of a model batch from HF-named inputs (numpy or jax arrays).

Validates shapes and placeholder counts (a mismatch is one clear error, never a silent wrong
answer), computes MRoPE position ids with the training-time rule, and lays out the vision tower's
inputs. The result is what the jitted forward takes.
"""

from __future__ import annotations

import numpy as np
from flax import struct

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.vision_layout import VisionInputs, stack_rows, token_index, vision_inputs
from qwenvl_jax.processing.rope_index import get_rope_index


@struct.dataclass
class ModelInputs:
    input_ids: np.ndarray  # [B, L] int32
    position_ids: np.ndarray  # [3, B, L] int32
    segment_ids: np.ndarray  # [B, L] int32: 1 for tokens, 0 for padding
    rope_deltas: np.ndarray  # [B] int32
    vision: VisionInputs | None = None  # one vision row shared by the batch, or one per row (packed)
    vision_token_index: np.ndarray | None = None  # [B, L] feature index per token, -1 for text


def _array(x, name, ndim=None, dtype=None):
    if x is None:
        return None
    x = np.asarray(x)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    return x if dtype is None else x.astype(dtype)


def prepare_inputs(
    config: Qwen25VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    position_ids=None,
    rope_rule: str = "trained",
) -> ModelInputs:
    ids = _array(input_ids, "input_ids", 2)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    b, length = ids.shape
    vocab = config.text.vocab_size
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"input_ids hold token id {int(ids.max() if ids.max() >= vocab else ids.min())} "
                         f"outside the vocabulary [0, {vocab})")
    mask = np.ones_like(ids) if attention_mask is None else _array(attention_mask, "attention_mask", 2)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")

    items = []  # (kind, pixel values, grids, placeholder token id)
    for kind, pv, grid, tok in (("image", pixel_values, image_grid_thw, config.image_token_id),
                                ("video", pixel_values_videos, video_grid_thw, config.video_token_id)):
        pv, grid = _array(pv, f"pixel values ({kind})", 2), _array(grid, f"{kind}_grid_thw", 2, np.int64)
        if (pv is None) != (grid is None):
            raise ValueError(f"{kind}: pixel values and grid_thw must be given together")
        n_tokens = 0 if grid is None else int(np.prod(grid, axis=1).sum()) // config.vision.merge_unit
        n_placeholders = int(((ids == tok) & (mask != 0)).sum())
        if n_placeholders != n_tokens:
            raise ValueError(f"input_ids hold {n_placeholders} {kind} placeholder tokens (id {tok}) but the "
                             f"{kind} grids {[] if grid is None else grid.tolist()} give {n_tokens} "
                             f"{kind} features")
        items.append((pv, grid))

    if position_ids is None:
        position_ids, deltas = get_rope_index(
            ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
            image_grid_thw=items[0][1], video_grid_thw=items[1][1],
            second_per_grid_ts=second_per_grid_ts, attention_mask=mask,
            spatial_merge_size=config.vision.spatial_merge_size,
            tokens_per_second=config.vision.tokens_per_second, rule=rope_rule)
    else:
        position_ids = _array(position_ids, "position_ids", 3, np.int32)
        if position_ids.shape != (3, b, length):
            raise ValueError(f"position_ids must have shape (3, {b}, {length}), got {position_ids.shape}")
        valid = np.where(mask != 0, position_ids.max(0), -1)
        deltas = (valid.max(1) + 1 - (mask != 0).sum(1)).astype(np.int32)

    vision = index = None
    present = [(pv, g) for pv, g in items if pv is not None]
    if present:
        pv = np.concatenate([p for p, _ in present]).astype(np.float32, copy=False)
        grids = np.concatenate([g for _, g in present])
        vision = stack_rows([vision_inputs(pv, grids, config.vision)], merge_unit=config.vision.merge_unit)
        image_units = 0 if items[0][1] is None else int(np.prod(items[0][1], axis=1).sum()) // config.vision.merge_unit
        index = np.where(mask != 0, token_index(ids, config.image_token_id, config.video_token_id, image_units), -1)
    return ModelInputs(input_ids=ids.astype(np.int32), position_ids=position_ids.astype(np.int32),
                       segment_ids=(mask != 0).astype(np.int32), rope_deltas=deltas, vision=vision,
                       vision_token_index=None if index is None else index.astype(np.int32))
