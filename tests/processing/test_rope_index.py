"""MRoPE position ids: SPEC section 6's worked example and transformers' get_rope_index."""

import numpy as np
import pytest
import torch
from hf_reference import TOKENS

from qwenvl_jax.processing.rope_index import get_rope_index

IMG, VID = TOKENS["image_token_id"], TOKENS["video_token_id"]
KW = dict(image_token_id=IMG, video_token_id=VID)


def test_spec_video_example_both_rules():
    """Grid (4,4,6), 2 s per temporal patch, 2 tokens/s, after 3 text tokens (SPEC 6)."""
    ids = np.array([[1, 2, 3] + [VID] * 24 + [7, 8, 9]])
    trained, d_a = get_rope_index(ids, **KW, video_grid_thw=[(4, 4, 6)], second_per_grid_ts=[2.0])
    t = trained[0, 0, 3:27].reshape(4, 6)[:, 0]
    assert t.tolist() == [3, 7, 11, 15]
    assert trained[:, 0, 27:].tolist() == [[16, 17, 18]] * 3
    assert d_a.tolist() == [-11]
    hf5, d_c = get_rope_index(ids, **KW, video_grid_thw=[(4, 4, 6)], second_per_grid_ts=[2.0],
                              rule="transformers5")
    assert hf5[:, 0, 27:].tolist() == [[6, 7, 8]] * 3
    assert d_c.tolist() == [-14]


def test_fractional_interval_truncates():
    """0.5 s per temporal patch at 2 tokens/s: one position per slice, not collapsed to 0."""
    ids = np.array([[VID] * 8])
    pos, _ = get_rope_index(ids, **KW, video_grid_thw=[(4, 2, 4)], second_per_grid_ts=[0.5])
    assert pos[0, 0, ::2].tolist() == [0, 1, 2, 3]


def test_transformers5_rule_matches_transformers(tiny_checkpoint):
    """Our 'transformers5' rule reproduces HF 5.x's get_rope_index on a padded mixed batch,
    and the default rule agrees with it wherever there is no video."""
    _, hf = tiny_checkpoint("untied_w112")
    rng = np.random.default_rng(0)
    row0 = [5, 6] + [IMG] * 6 + [7] + [VID] * 12 + [8, 9, 10]  # image (1,4,6), video (2,4,6)
    row1 = [11] + [IMG] * 4 + [12, 13]  # image (1,4,4)
    pad = len(row0) - len(row1)
    ids = np.array([row0, [0] * pad + row1])
    mask = (np.arange(len(row0))[None] >= np.array([[0], [pad]])).astype(np.int64)
    img, vid, spg = np.array([(1, 4, 6), (1, 4, 4)]), np.array([(2, 4, 6)]), np.array([1.25], np.float32)
    mm = (ids == IMG) + 2 * (ids == VID)
    ref, ref_d = hf.model.get_rope_index(torch.tensor(ids), torch.tensor(mm), torch.tensor(img),
                                         torch.tensor(vid), torch.tensor(spg), torch.tensor(mask))
    ours, d = get_rope_index(ids, **KW, image_grid_thw=img, video_grid_thw=vid, second_per_grid_ts=spg,
                             attention_mask=mask, rule="transformers5")
    valid = mask.astype(bool)
    assert (ours[:, valid] == ref.numpy()[:, valid]).all()
    assert d.tolist() == ref_d.numpy().ravel().tolist()
    trained, _ = get_rope_index(ids, **KW, image_grid_thw=img, video_grid_thw=vid,
                                second_per_grid_ts=spg, attention_mask=mask)
    assert (trained[:, 1][:, valid[1]] == ref.numpy()[:, 1][:, valid[1]]).all()  # no video in row 1
    del rng


def test_count_mismatch_is_a_clear_error():
    ids = np.array([[1] + [IMG] * 6 + [2]])
    with pytest.raises(ValueError, match="needs 12 consecutive placeholder"):
        get_rope_index(ids, **KW, image_grid_thw=[(1, 4, 12)])
    with pytest.raises(ValueError, match="2 image grids given but input_ids hold 1"):
        get_rope_index(ids, **KW, image_grid_thw=[(1, 4, 6), (1, 4, 6)])
