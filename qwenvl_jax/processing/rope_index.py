"""3-axis MRoPE position ids (temporal, height, width) for a multimodal token sequence.

Host-side numpy; SPEC section 6. Text tokens advance all three axes together. A vision item of
grid (t, h, w) covers t*(h/m)*(w/m) placeholder tokens in raster order (ti slowest) with
    T = p + int(ti * second_per_grid_t * tokens_per_second),  H = p + hi,  W = p + wi,
so the temporal axis is in absolute time (tokens_per_second position steps per second of video).

Where the text after a vision item resumes is the point where published code disagrees:
  rule="trained"       (default; variant A, what the released weights were trained with):
                       1 + the largest position of the item over all three axes;
  rule="transformers5" (variant C, transformers 5.x `get_rope_index`): p + max(h/m, w/m), which
                       ignores the temporal extent. For comparison only.
For images (t = 1) the two agree.
"""

from __future__ import annotations

import numpy as np

RULES = ("trained", "transformers5")


def get_rope_index(
    input_ids: np.ndarray,  # [B, L]
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: np.ndarray | None = None,  # [n_img, 3]
    video_grid_thw: np.ndarray | None = None,  # [n_vid, 3]
    second_per_grid_ts: np.ndarray | None = None,  # [n_vid]
    attention_mask: np.ndarray | None = None,  # [B, L], 0 = padding
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
    rule: str = "trained",
) -> tuple[np.ndarray, np.ndarray]:
    """Returns position_ids [3, B, L] int32 (padding slots get 0) and rope_deltas [B] int32.

    rope_delta = max position + 1 - number of real tokens, so a token appended after the prompt at
    index i (counting real tokens) sits at position i + rope_delta on all three axes.
    Images and videos are consumed in row-major order over the batch, as in transformers.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    b, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    grids = {
        image_token_id: _as_grid_list(image_grid_thw),
        video_token_id: _as_grid_list(video_grid_thw),
    }
    spg = [1.0] * len(grids[video_token_id])
    if second_per_grid_ts is not None:
        spg = [float(x) for x in np.asarray(second_per_grid_ts, np.float32).reshape(-1)]
        if len(spg) != len(grids[video_token_id]):
            raise ValueError(f"second_per_grid_ts has {len(spg)} entries for "
                             f"{len(grids[video_token_id])} videos")
    next_item = {image_token_id: 0, video_token_id: 0}

    position_ids = np.zeros((3, b, length), np.int32)
    deltas = np.zeros((b,), np.int32)
    m = spatial_merge_size
    for row in range(b):
        ids = input_ids[row][mask[row]]
        pos = np.zeros((3, len(ids)), np.int64)
        p, i = 0, 0
        while i < len(ids):
            tok = int(ids[i])
            if tok not in grids:
                j = i
                while j < len(ids) and int(ids[j]) not in grids:
                    j += 1
                pos[:, i:j] = p + np.arange(j - i)
                p += j - i
                i = j
                continue
            k = next_item[tok]
            kind = "image" if tok == image_token_id else "video"
            if k >= len(grids[tok]):
                raise ValueError(f"more {kind} placeholder runs in input_ids than {kind} grids "
                                 f"({len(grids[tok])} given)")
            next_item[tok] += 1
            t, h, w = grids[tok][k]
            lh, lw = h // m, w // m
            n = t * lh * lw
            if i + n > len(ids) or np.any(ids[i:i + n] != tok):
                raise ValueError(f"{kind} {k} with grid {(t, h, w)} needs {n} consecutive placeholder "
                                 f"tokens in row {row}, found fewer")
            interval = np.float32(tokens_per_second) * np.float32(spg[k] if tok == video_token_id else 1.0)
            # float32 product then truncation, as the reference computes it
            tt = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
            grid_t, grid_h, grid_w = np.meshgrid(tt, np.arange(lh), np.arange(lw), indexing="ij")
            pos[:, i:i + n] = p + np.stack([grid_t.ravel(), grid_h.ravel(), grid_w.ravel()])
            if rule == "trained":
                p = int(pos[:, i:i + n].max()) + 1
            else:
                p += max(lh, lw)
            i += n
        position_ids[:, row, mask[row]] = pos
        deltas[row] = (int(pos.max()) + 1 if len(ids) else 0) - len(ids)
    for tok, kind in ((image_token_id, "image"), (video_token_id, "video")):
        if next_item[tok] != len(grids[tok]):
            raise ValueError(f"{len(grids[tok])} {kind} grids given but input_ids hold "
                             f"{next_item[tok]} {kind} placeholder runs")
    return position_ids, deltas


def _as_grid_list(grid_thw) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    g = np.asarray(grid_thw).reshape(-1, 3)
    return [tuple(int(x) for x in r) for r in g]
