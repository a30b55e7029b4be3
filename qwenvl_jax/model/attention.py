"""The one attention entry point used by both towers.

Tokens attend only to tokens with the same segment id (ViT windows, whole frames for the ViT's
full-attention blocks, samples of a packed batch, real-vs-padding in the LLM), optionally causally.

Two XLA implementations, chosen by shape:
  * dense:  scores [B, K, G, N, S] with a mask; used for the LLM and whenever segments are long.
  * banded: when every segment is contiguous and at most `max_segment_len` long, a query block
    can only see keys within `max_segment_len - 1` positions of it, so each block of `bq` queries
    attends to (2r+1) key blocks around it: cost O(N * max_segment_len), not O(N^2).
  * windows: when segments are runs of whole aligned windows (the ViT's slot layout), each query
    window attends to the ceil(max_segment_len / window) windows from its segment's first one:
    O(N * max_segment_len) with no band overhang (the ViT's full-attention blocks).
The Pallas TPU kernels (kernels/) replace these on TPU; kernels.sharded decides which runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully-masked rows stay NaN-free
_MAX_BLOCK = 256


def attend(q, k, v, *, q_segment_ids, kv_segment_ids, causal: bool, q_positions=None,
           kv_positions=None, max_segment_len: int | None = None, aligned: bool = False,
           window: int | None = None, scale: float | None = None):
    """Segment-restricted multi-head attention with grouped KV heads.

    q [B, N, Hq, D]; k, v [B, S, Hk, D] with Hq % Hk == 0 (q head h uses kv head h // (Hq/Hk));
    q_segment_ids [B, N], kv_segment_ids [B, S]: a query attends to keys of its own segment id;
    causal: additionally only keys with kv_position <= q_position (positions default to indices);
    max_segment_len: a static upper bound on segment length when segments are contiguous runs
    and q/k are the same sequence; enables the banded path.
    aligned: segments never cross multiples of max_segment_len (e.g. ViT windows padded to a
    fixed size), so attention is exactly block-diagonal with blocks of max_segment_len.
    window: every segment is a run of whole windows of `window` positions starting at multiples
    of it (padding inside a window has id 0), at most max_segment_len long; non-causal self-attention.
    Returns [B, N, Hq, D] in v's dtype.
    """
    b, n, hq, d = q.shape
    s = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if window is not None and max_segment_len is not None and n == s and not causal and n % window == 0:
        span = -(-max_segment_len // window)
        if span < n // window:
            return _windowed_segments(q, k, v, q_segment_ids, window, span, scale)
    if max_segment_len is not None and n == s:
        bq, r = (max_segment_len, 0) if aligned else _band_shape(max_segment_len)
        if (2 * r + 1) * bq < n:
            return _banded(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                           causal, scale, bq, r)
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, N, S]
    if causal:
        mask &= q_positions[:, :, None] >= kv_positions[:, None, :]
    return _masked_attention(q, k, v, mask, scale)


def _masked_attention(q, k, v, mask, scale):
    """q [..., N, Hq, D], k/v [..., S, Hk, D], mask [..., N, S] -> [..., N, Hq, D].

    Heads go in front of the sequence axes before the matmuls so the score tensor is produced in
    the layout softmax reads it (on CPU the sequence-major einsum was 4x slower).
    """
    *lead, n, hq, d = q.shape
    hk = k.shape[-2]
    nl = len(lead)
    qh = jnp.moveaxis(q.reshape(*lead, n, hk, hq // hk, d), nl, nl + 2)  # [..., K, G, N, D]
    kh, vh = jnp.moveaxis(k, nl, nl + 1), jnp.moveaxis(v, nl, nl + 1)  # [..., K, S, D]
    scores = jnp.einsum("...kgnd,...ksd->...kgns", qh, kh, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[..., None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # softmax in f32
    out = jnp.einsum("...kgns,...ksd->...kgnd", probs, vh)
    return jnp.moveaxis(out, nl + 2, nl).reshape(*lead, n, hq, d)


def _band_shape(max_segment_len: int) -> tuple[int, int]:
    """Query block size bq and key-block radius r with r*bq >= max_segment_len - 1."""
    bq = min(_MAX_BLOCK, max(8, 1 << math.ceil(math.log2(max(max_segment_len, 1)))))
    r = -(-(max_segment_len - 1) // bq)
    return bq, r


def _banded(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, scale, bq, r):
    b, n, hq, d = q.shape
    nb = -(-n // bq)
    tail = nb * bq - n
    # Padding queries get segment -1 and padding keys -2: they never match anything real.
    pad = lambda x, before, after, val: jnp.pad(  # noqa: E731
        x, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2), constant_values=val)
    qb = pad(q, 0, tail, 0).reshape(b, nb, bq, hq, d)
    q_seg_b = pad(q_seg, 0, tail, -1).reshape(b, nb, bq)
    q_pos_b = pad(q_pos, 0, tail, 0).reshape(b, nb, bq)

    def windows(x, val):  # [B, S, ...] -> [B, nb, (2r+1)*bq, ...]: key blocks i-r .. i+r
        xb = pad(x, r * bq, tail + r * bq, val).reshape(b, nb + 2 * r, bq, *x.shape[2:])
        return jnp.concatenate([xb[:, j:j + nb] for j in range(2 * r + 1)], axis=2)

    kw, vw = windows(k, 0), windows(v, 0)
    kv_seg_w, kv_pos_w = windows(kv_seg, -2), windows(kv_pos, 0)
    mask = q_seg_b[..., :, None] == kv_seg_w[..., None, :]  # [B, nb, bq, W]
    if causal:
        mask &= q_pos_b[..., :, None] >= kv_pos_w[..., None, :]
    out = _masked_attention(qb, kw, vw, mask, scale)  # [B, nb, bq, Hq, D]
    return out.reshape(b, nb * bq, hq, d)[:, :n]


def _windowed_segments(q, k, v, seg, w, span, scale):
    """Segments made of whole aligned windows: query window i sees key windows first(i) .. first(i)+span-1,
    where first(i) is the first window of i's segment; gathered windows past the end are masked out."""
    b, n, hq, d = q.shape
    nw = n // w
    win_seg = jnp.max(seg.reshape(b, nw, w), axis=-1)  # [B, nw]: a window holds one segment (+ padding 0)
    idx = jnp.arange(nw, dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), win_seg[:, 1:] != win_seg[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # [B, nw]
    cols = first[:, :, None] + jnp.arange(span, dtype=jnp.int32)  # [B, nw, span] key windows
    in_range = cols < nw
    cols = jnp.minimum(cols, nw - 1)

    def gather(x):  # [B, n, ...] -> [B, nw, span * w, ...]
        xw = x.reshape(b, nw, w, *x.shape[2:])
        g = jax.vmap(lambda xb, cb: xb[cb])(xw, cols)  # [B, nw, span, w, ...]
        return g.reshape(b, nw, span * w, *x.shape[2:])

    kv_seg = jnp.where(jnp.repeat(in_range, w, axis=-1), gather(seg), -2)  # out of range: matches nothing
    q_seg = seg.reshape(b, nw, w)
    mask = q_seg[..., :, None] == kv_seg[..., None, :]  # [B, nw, w, span*w]
    out = _masked_attention(q.reshape(b, nw, w, hq, d), gather(k), gather(v), mask, scale)
    return out.reshape(b, n, hq, d)


def causal_blocked(q, k, v, segment_ids, block: int = 256, scale: float | None = None):
    """Causal self-attention within segments, for inference: query block i visits key blocks
    0..i only (an online softmax over them), so the masked half is never computed and no
    [N, N] scores exist. On CPU a 3584-token prompt's attention took 1/5 of the dense path's time.
    The loop's trip count depends on the block, so this is not reverse-differentiable (training
    uses `attend`).

    q [B, N, Hq, D]; k, v [B, N, Hk, D]; segment_ids [B, N]. Returns [B, N, Hq, D] in v's dtype.
    """
    b, n, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    scale = d ** -0.5 if scale is None else scale
    nb = -(-n // block)
    tail = nb * block - n
    pad = lambda x, val: jnp.pad(x, [(0, 0), (0, tail)] + [(0, 0)] * (x.ndim - 2), constant_values=val)  # noqa: E731
    f32 = jnp.float32
    # blocks on the leading axis, each in its matmul's operand layout
    qb = pad(q, 0).reshape(b, nb, block, hk, g, d).transpose(1, 0, 3, 4, 2, 5)  # [nb, B, K, G, bq, D]
    kb = pad(k, 0).reshape(b, nb, block, hk, d).transpose(1, 0, 3, 4, 2)  # [nb, B, K, D, bk]
    vb = pad(v, 0).reshape(b, nb, block, hk, d).transpose(1, 0, 3, 2, 4)  # [nb, B, K, bk, D]
    q_seg = pad(segment_ids, -1).reshape(b, nb, block).transpose(1, 0, 2)  # padding matches nothing real
    kv_seg = pad(segment_ids, -2).reshape(b, nb, block).transpose(1, 0, 2)
    causal = jnp.arange(block)[:, None] >= jnp.arange(block)[None, :]

    def query_block(i):
        qi = (qb[i].astype(f32) * scale).astype(q.dtype)

        def key_block(j, carry):
            m, total, acc = carry
            scores = jnp.einsum("bkgqd,bkds->bkgqs", qi, kb[j], preferred_element_type=f32)
            mask = (q_seg[i][:, :, None] == kv_seg[j][:, None, :]) & ((j < i) | causal)[None]
            scores = jnp.where(mask[:, None, None], scores, _NEG)
            m_new = jnp.maximum(m, scores.max(-1, keepdims=True))
            # Blocks before a query's first visible key add exp(0) terms; the first real key's
            # correction exp(_NEG - m) == 0 erases them (every real query sees itself).
            p, correction = jnp.exp(scores - m_new), jnp.exp(m - m_new)
            acc = acc * correction + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), vb[j],
                                                preferred_element_type=f32)
            return m_new, total * correction + p.sum(-1, keepdims=True), acc

        stats = jnp.full((b, hk, g, block, 1), _NEG, f32), jnp.zeros((b, hk, g, block, 1), f32)
        _, total, acc = jax.lax.fori_loop(0, i + 1, key_block, (*stats, jnp.zeros((b, hk, g, block, d), f32)))
        return (acc / total).astype(v.dtype)

    out = jax.lax.map(query_block, jnp.arange(nb))  # [nb, B, K, G, bq, D]
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, hq, d)[:, :n]


def cache_masks(q_segment_ids, kv_segment_ids):
    """What each of L new tokens sees: cache slots [B, L, S] (filled slots of its own segment;
    kv_segment_ids from before these tokens are written) and the new tokens [B, L, L] (its own
    segment, causally). Built once per step and shared by every layer."""
    n = q_segment_ids.shape[1]
    same = q_segment_ids[:, :, None] == q_segment_ids[:, None, :]
    causal = jnp.arange(n)[:, None] >= jnp.arange(n)[None, :]
    return q_segment_ids[:, :, None] == kv_segment_ids[:, None, :], same & causal[None]


def attend_cache(q, k_cache, v_cache, k_new, v_new, cache_mask, new_mask, scale: float | None = None):
    """New tokens against one layer's KV cache (as it was before them) and against each other.

    q [B, L, Hq, D]; k_cache [B, Hk, D, S] and v_cache [B, Hk, S, D], each the operand layout of
    its matmul, so no step transposes or copies the cache; k_new, v_new [B, L, Hk, D];
    cache_mask [B, L, S] and new_mask [B, L, L] (cache_masks). One softmax over both, in f32.
    Returns [B, L, Hq, D] in v_cache's dtype.
    """
    b, n, hq, d = q.shape
    hk = k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qh = q.reshape(b, n, hk, hq // hk, d).transpose(0, 2, 3, 1, 4).astype(k_cache.dtype)  # [B, K, G, L, D]
    f32 = jnp.float32
    s_cache = jnp.einsum("bkgnd,bkds->bkgns", qh, k_cache, preferred_element_type=f32) * scale
    s_new = jnp.einsum("bkgnd,bmkd->bkgnm", qh, k_new.astype(qh.dtype), preferred_element_type=f32) * scale
    s_cache = jnp.where(cache_mask[:, None, None], s_cache, _NEG)
    s_new = jnp.where(new_mask[:, None, None], s_new, _NEG)
    m = jnp.maximum(s_cache.max(-1, keepdims=True), s_new.max(-1, keepdims=True))
    p_cache, p_new = jnp.exp(s_cache - m), jnp.exp(s_new - m)
    total = p_cache.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
    dtype = v_cache.dtype
    out = (jnp.einsum("bkgns,bksd->bkgnd", (p_cache / total).astype(dtype), v_cache, preferred_element_type=f32)
           + jnp.einsum("bkgnm,bmkd->bkgnd", (p_new / total).astype(dtype), v_new.astype(dtype),
                        preferred_element_type=f32))
    return out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(b, n, hq, d)
