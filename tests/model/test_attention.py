"""attend() against a float64 numpy reference of segment-masked softmax attention."""

import numpy as np
import pytest

from qwenvl_jax.model.attention import _band_shape, attend, causal_blocked


def reference(q, k, v, qseg, kseg, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, n, hq, d = q.shape
    g = hq // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # kv head j serves q heads j*g..j*g+g-1
    s = np.einsum("bnhd,bshd->bhns", q, k) / np.sqrt(d)
    mask = qseg[:, None, :, None] == kseg[:, None, None, :]
    if causal:
        mask = mask & (np.arange(n)[:, None] >= np.arange(k.shape[1])[None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhns,bshd->bnhd", p, v)


def segments(rng, n, max_len):
    """Contiguous runs of random length 1..max_len, ids 1, 2, ..."""
    ids, cur = [], 1
    while len(ids) < n:
        ids += [cur] * int(rng.integers(1, max_len + 1))
        cur += 1
    return np.array(ids[:n])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,max_len", [(300, 64), (517, 16), (1000, 200)])
def test_banded_matches_reference(n, max_len, causal):
    rng = np.random.default_rng(n)
    q = rng.standard_normal((1, n, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, n, 2, 8)).astype(np.float32)
    v = rng.standard_normal((1, n, 2, 8)).astype(np.float32)
    seg = segments(rng, n, max_len)[None]
    bq, r = _band_shape(max_len)
    assert (2 * r + 1) * bq < n, "case must exercise the banded path"
    out = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal, max_segment_len=max_len)
    np.testing.assert_allclose(np.asarray(out), reference(q, k, v, seg, seg, causal), atol=2e-5)


def test_dense_with_padding_and_gqa():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 12, 6, 4)).astype(np.float32)
    k = rng.standard_normal((2, 12, 3, 4)).astype(np.float32)
    v = rng.standard_normal((2, 12, 3, 4)).astype(np.float32)
    seg = np.ones((2, 12), np.int32)
    seg[1, :5] = 0  # left padding: padding attends only to padding, real tokens only to real ones
    out = np.asarray(attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True))
    np.testing.assert_allclose(out, reference(q, k, v, seg, seg, True), atol=2e-5)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("n,block", [(300, 64), (256, 64), (70, 32)])
def test_causal_blocked_matches_reference(n, block):
    """The inference prefill's blocked causal path: left padding, packed segments, GQA, a ragged
    last block; real queries equal the float64 reference (padding rows are discarded by callers
    but stay finite)."""
    rng = np.random.default_rng(n)
    q = rng.standard_normal((2, n, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, n, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, n, 2, 8)).astype(np.float32)
    seg = np.stack([np.r_[np.zeros(n // 3), np.ones(n - n // 3)], segments(rng, n, n // 4)]).astype(np.int32)
    out = np.asarray(causal_blocked(q, k, v, seg, block=block))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference(q, k, v, seg, seg, True), atol=2e-5)


def window_segments(rng, windows: int, w: int, max_windows: int):
    """The ViT slot layout: segments of 1..max_windows whole windows of w slots, each window
    partly filled (padding slots id 0), plus trailing all-padding windows."""
    ids, cur = [], 1
    while len(ids) < (windows - 2) * w:
        for _ in range(int(rng.integers(1, max_windows + 1))):
            fill = int(rng.integers(1, w + 1))
            ids += [cur] * fill + [0] * (w - fill)
        cur += 1
    return np.array((ids + [0] * 2 * w)[:windows * w])


@pytest.mark.parametrize("rows,windows,w,max_windows", [(2, 18, 16, 3), (1, 12, 8, 5)])
def test_window_segments_match_reference(rows, windows, w, max_windows):
    """Full attention over whole-window segments (the ViT's full blocks) gathers only each segment's
    windows; it equals dense segment-masked attention on the real (non-padding) slots."""
    rng = np.random.default_rng(windows)
    n = windows * w
    q = rng.standard_normal((rows, n, 4, 8)).astype(np.float32)
    k = rng.standard_normal((rows, n, 4, 8)).astype(np.float32)
    v = rng.standard_normal((rows, n, 4, 8)).astype(np.float32)
    seg = np.stack([window_segments(rng, windows, w, max_windows) for _ in range(rows)])
    span = max_windows * w
    out = np.asarray(attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=False, max_segment_len=span,
                            window=w))
    real = seg > 0
    np.testing.assert_allclose(out[real], reference(q, k, v, seg, seg, False)[real], atol=2e-5)
    assert np.isfinite(out).all()
