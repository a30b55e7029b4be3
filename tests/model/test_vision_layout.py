"""Window order, rotary ids and segments against SPEC's worked example and transformers' own helpers."""

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from qwenvl_jax.config import VisionConfig
from qwenvl_jax.model.vision_layout import rotary_positions, vision_inputs, window_index

GRIDS = [[(1, 12, 16)], [(1, 10, 14), (2, 6, 4)], [(3, 16, 16)], [(1, 2, 2), (1, 30, 8)]]


def test_spec_worked_example():
    idx, _ = window_index([(1, 12, 16)], VisionConfig())
    expected = ([0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27, 4, 5, 6, 7, 12, 13, 14, 15,
                 20, 21, 22, 23, 28, 29, 30, 31, 32, 33, 34, 35, 40, 41, 42, 43, 36, 37, 38, 39,
                 44, 45, 46, 47])
    assert idx.tolist() == expected


@pytest.mark.parametrize("window", [112, 56])
@pytest.mark.parametrize("grids", GRIDS)
def test_matches_transformers(grids, window):
    cfg = VisionConfig(window_size=window)
    g = torch.tensor(grids)
    ref_idx, ref_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=window, patch_size=14)
    assert window_index(grids, cfg)[0].tolist() == ref_idx.tolist()

    n = int(np.prod(grids, axis=1).sum())
    vi = vision_inputs(np.zeros((n, cfg.patch_dim), np.float32), grids, cfg)
    real_units = vi.unit_index < n // 4
    assert vi.unit_index[real_units].tolist() == ref_idx.tolist()  # slots keep HF's window order
    assert (vi.unit_index[vi.reverse_index] == np.arange(n // 4)).all()
    real = np.repeat(real_units, 4)
    assert len(real) % cfg.window_patches == 0
    # Windows: boundaries among the real slots == HF's cu_window_seqlens; each window in one block.
    win = vi.window_segment_ids[real]
    change = np.flatnonzero(np.diff(win)) + 1
    assert [0, *change.tolist(), n] == ref_cu.tolist()
    blocks = vi.window_segment_ids.reshape(-1, cfg.window_patches)
    assert all(len(set(b[b > 0])) <= 1 for b in blocks)
    assert (vi.window_segment_ids[~real] == 0).all() and (vi.full_segment_ids[~real] == 0).all()
    # Rotary ids: HF's per-patch (row, col), permuted into window order.
    ref_pos = get_vision_position_ids(g, 2).numpy()
    assert rotary_positions(grids, 2).tolist() == ref_pos.tolist()
    assert vi.rotary_pos[real].tolist() == ref_pos.reshape(-1, 4, 2)[ref_idx.numpy()].reshape(-1, 2).tolist()
    # Full-attention segments: one per (item, temporal slice); the static span bound is the longest
    # slice's span, not more (a loose bound multiplies the full-attention blocks' work).
    sizes = np.bincount(vi.full_segment_ids)[1:]
    assert sizes.tolist() == [h * w for t, h, w in grids for _ in range(t)]
    spans = [np.ptp(np.flatnonzero(vi.full_segment_ids == seg)) + 1 for seg in range(1, len(sizes) + 1)]
    assert vi.max_full_len == max(spans)
