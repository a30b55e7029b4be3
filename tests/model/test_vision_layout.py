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
    n = int(np.prod(grids, axis=1).sum())
    vi = vision_inputs(np.zeros((n, cfg.patch_dim), np.float32), grids, cfg)
    assert vi.window_index.tolist() == ref_idx.tolist()
    # Window segments: boundaries where the segment id changes == HF's cu_window_seqlens.
    change = np.flatnonzero(np.diff(vi.window_segment_ids)) + 1
    assert [0, *change.tolist(), n] == ref_cu.tolist()
    ref_pos = get_vision_position_ids(g, 2).numpy()
    assert rotary_positions(grids, 2).tolist() == ref_pos.tolist()
    # Full-attention segments: one per (item, temporal slice), contiguous in window order.
    sizes = np.bincount(vi.full_segment_ids)[1:]
    assert sizes.tolist() == [h * w for t, h, w in grids for _ in range(t)]
