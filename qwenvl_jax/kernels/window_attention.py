"""Pallas TPU kernel: self-attention restricted to segments (ViT windows, whole frame groups).

    out = segment_attention(q, k, v, segment_ids, max_segment_len=64)   # q, k, v [H, S, D]

A query attends to the keys with its own segment id; id 0 marks padding, which attends to nothing
and outputs zeros. Flash-attention style: the sequence is cut into blocks of `block` rows; for each
query block the keys it can reach lie in a contiguous run of key blocks [first, first + count)
(segments are contiguous runs, padding aside), computed once from the segment ids
(`block_ranges`) and handed to the kernel as scalar-prefetched metadata. The grid's key axis has
only `steps` entries (a static bound from `max_segment_len`: about 3 for 64-patch windows in
128-row blocks); steps past a block's count are skipped and their key block index repeats, so
they fetch nothing. Online softmax in f32; bf16 or f32 inputs.

The backward pass is two more kernels over the same ranges (attention between block i and j is
symmetric, so the key-block ranges of a query block are also the query-block ranges of a key
block): dq per query block, dk/dv per key block, from the saved log-sum-exp.

`interpret=True` (or a `pltpu.InterpretParams`) runs the kernels on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # per-row statistics are kept replicated over one vreg width (TPU layout)
SUBLANES = 8
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def block_ranges(segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per block of `block` rows: (first key block, number of key blocks) its rows can attend to.

    segment_ids [S] (S a multiple of block), 0 = padding. Traced; compute it once and share it
    across layers that use the same segments.
    """
    s = segment_ids.shape[0]
    pos = jnp.arange(s, dtype=jnp.int32)
    real = segment_ids > 0
    seg = jnp.where(real, segment_ids, 0)
    first = jax.ops.segment_min(jnp.where(real, pos, s), seg, num_segments=s + 1)
    last = jax.ops.segment_max(jnp.where(real, pos, -1), seg, num_segments=s + 1)
    lo = jnp.where(real, first[seg], s).reshape(-1, block).min(1)
    hi = jnp.where(real, last[seg], -1).reshape(-1, block).max(1)
    any_real = hi >= 0
    start = jnp.where(any_real, lo // block, 0).astype(jnp.int32)
    count = jnp.where(any_real, hi // block - lo // block + 1, 0).astype(jnp.int32)
    return start, count


def segment_ranges(segment_ids: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """`block_ranges` of the ids padded as `segment_attention` pads them: compute once, pass as
    `ranges=` to every layer that attends over the same segments."""
    s = segment_ids.shape[0]
    return block_ranges(jnp.pad(segment_ids, (0, -(-s // block) * block - s)), block)


def max_steps(num_blocks: int, block: int, max_segment_len: int | None) -> int:
    """Static bound on key blocks per query block: a block of rows plus one segment either side."""
    if max_segment_len is None:
        return num_blocks
    return max(1, min(num_blocks, (block + 2 * max_segment_len - 2) // block + 2))


def _kv_block(start_ref, count_ref, i, j):
    # Past the count, repeat the last block: the pipeline then fetches nothing new.
    return start_ref[i] + jnp.minimum(j, jnp.maximum(count_ref[i] - 1, 0))


def _scores(q, k, qs, ks, scale):
    """Masked scores [bq, bk] in f32 and the mask (same segment, not padding)."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    bk = k.shape[0]
    q_ids = qs[:, :bk] if bk <= LANES else jnp.tile(qs, (1, bk // LANES))  # [bq, bk]
    mask = (q_ids == ks) & (q_ids != 0)
    return jnp.where(mask, s, _NEG), mask


def _lanes_to(x, width):
    """[rows, LANES] replicated statistic -> [rows, width]."""
    if width == LANES:
        return x
    if width < LANES:
        return x[:, :width]
    return jnp.tile(x, (1, width // LANES))


def _fwd_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, *refs, scale, steps, with_lse):
    # The log-sum-exp is an output only when a backward pass will read it (it is stored [S, 128]).
    lse_ref, (m_sc, l_sc, acc_sc) = (refs[0], refs[1:]) if with_lse else (None, refs)
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < count_ref[i])
    def _step():
        s, mask = _scores(q_ref[0], k_ref[0], qs_ref[...], ks_ref[:1, :], scale)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, LANES]
        p = jnp.where(mask, jnp.exp(s - _lanes_to(m_next, s.shape[1])), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_next
        v = v_ref[0]
        pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_sc[...] = acc_sc[...] * _lanes_to(alpha, pv.shape[1]) + pv

    @pl.when(j == steps - 1)
    def _finish():
        denom = l_sc[...]
        safe = jnp.where(denom == 0.0, 1.0, denom)
        o_ref[0] = (acc_sc[...] / _lanes_to(safe, acc_sc.shape[1])).astype(o_ref.dtype)
        if with_lse:
            lse_ref[0] = jnp.where(denom == 0.0, 0.0, m_sc[...] + jnp.log(safe))


def _dq_kernel(start_ref, count_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dq_sc, *, scale, steps):
    i, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(j < count_ref[i])
    def _step():
        k, v, do = k_ref[0], v_ref[0], do_ref[0]
        s, mask = _scores(q_ref[0], k, qs_ref[...], ks_ref[:1, :], scale)
        bk = s.shape[1]
        p = jnp.where(mask, jnp.exp(s - _lanes_to(lse_ref[0], bk)), 0.0)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes_to(delta_ref[0], bk))
        dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[0] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(start_ref, count_ref, k_ref, v_ref, q_ref, ks_ref, qs_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, scale, steps):
    i, j = pl.program_id(1), pl.program_id(2)  # i: key block, j: step over its query blocks

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(j < count_ref[i])
    def _step():
        q, k, v, do = q_ref[0], k_ref[0], v_ref[0], do_ref[0]
        s, mask = _scores(q, k, qs_ref[...], ks_ref[:1, :], scale)  # [bq, bk]
        bk = s.shape[1]
        p = jnp.where(mask, jnp.exp(s - _lanes_to(lse_ref[0], bk)), 0.0)
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TN, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes_to(delta_ref[0], bk))
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TN, preferred_element_type=jnp.float32)

    @pl.when(j == steps - 1)
    def _finish():
        dk_ref[0] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[0] = dv_sc[...].astype(dv_ref.dtype)


def _specs(block, d):
    """BlockSpecs over grid (head, block i, step j) with prefetched (start, count): "own" follows
    block i, "other" the j-th block of i's range."""
    def own(h, i, j, start, count):
        return (h, i, 0)

    def other(h, i, j, start, count):
        return (h, _kv_block(start, count, i, j), 0)

    def own_rows(h, i, j, start, count):
        return (i, 0)

    def other_rows(h, i, j, start, count):
        return (_kv_block(start, count, i, j), 0)

    def own_cols(h, i, j, start, count):
        return (0, i)

    def other_cols(h, i, j, start, count):
        return (0, _kv_block(start, count, i, j))

    def tile(width, index):
        return pl.BlockSpec((1, block, width), index)

    return dict(own=tile(d, own), other=tile(d, other), own_stat=tile(LANES, own), other_stat=tile(LANES, other),
                own_rows=pl.BlockSpec((block, LANES), own_rows), other_rows=pl.BlockSpec((block, LANES), other_rows),
                own_cols=pl.BlockSpec((SUBLANES, block), own_cols),
                other_cols=pl.BlockSpec((SUBLANES, block), other_cols))


def _params(semantics=("parallel", "parallel", "arbitrary")):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _prepare(segment_ids):
    """Row-layout [S, LANES] and column-layout [SUBLANES, S] copies of the segment ids."""
    s = segment_ids.shape[0]
    seg = segment_ids.astype(jnp.int32)
    return (jax.lax.broadcast_in_dim(seg, (s, LANES), (0,)), jax.lax.broadcast_in_dim(seg, (SUBLANES, s), (1,)))


def _forward(q, k, v, segment_ids, start, count, *, scale, block, steps, interpret, with_lse=True):
    """(out, lse [H, S] or None without with_lse)."""
    h, s, d = q.shape
    nb = s // block
    rows, cols = _prepare(segment_ids)
    sp = _specs(block, d)
    kernel = functools.partial(_fwd_kernel, scale=scale, steps=steps, with_lse=with_lse)
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if with_lse:
        out_shape.append(jax.ShapeDtypeStruct((h, s, LANES), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(h, nb, steps),
            in_specs=[sp["own"], sp["other"], sp["other"], sp["own_rows"], sp["other_cols"]],
            out_specs=[sp["own"], sp["own_stat"]][:len(out_shape)],
            scratch_shapes=[pltpu.VMEM((block, LANES), jnp.float32), pltpu.VMEM((block, LANES), jnp.float32),
                            pltpu.VMEM((block, d), jnp.float32)]),
        out_shape=out_shape, compiler_params=_params(), interpret=interpret,
        cost_estimate=pl.CostEstimate(flops=4 * h * nb * steps * block * block * d,
                                      transcendentals=h * nb * steps * block * block,
                                      bytes_accessed=q.dtype.itemsize * h * s * d * (2 + 2 * steps)),
    )(start, count, q, k, v, rows, cols)
    return (outs[0], outs[1][..., 0]) if with_lse else (outs[0], None)


def _backward(q, k, v, segment_ids, start, count, o, lse, do, *, scale, block, steps, interpret):
    h, s, d = q.shape
    nb = s // block
    rows, cols = _prepare(segment_ids)
    sp = _specs(block, d)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    lse_l = jnp.broadcast_to(lse[..., None], (h, s, LANES))
    delta_l = jnp.broadcast_to(delta[..., None], (h, s, LANES))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(h, nb, steps),
            in_specs=[sp["own"], sp["other"], sp["other"], sp["own_rows"], sp["other_cols"], sp["own"],
                      sp["own_stat"], sp["own_stat"]],
            out_specs=sp["own"], scratch_shapes=[pltpu.VMEM((block, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), compiler_params=_params(), interpret=interpret,
    )(start, count, q, k, v, rows, cols, do, lse_l, delta_l)
    # Per key block: its rows are "own" (k, v, column ids), the query side comes from the range.
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(h, nb, steps),
            in_specs=[sp["own"], sp["own"], sp["other"], sp["own_cols"], sp["other_rows"], sp["other"],
                      sp["other_stat"], sp["other_stat"]],
            out_specs=[sp["own"], sp["own"]],
            scratch_shapes=[pltpu.VMEM((block, d), jnp.float32), pltpu.VMEM((block, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(), interpret=interpret,
    )(start, count, k, v, q, cols, rows, do, lse_l, delta_l)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, segment_ids, start, count, scale, block, steps, interpret):
    # Not differentiated (inference, a frozen tower): no log-sum-exp output.
    return _forward(q, k, v, segment_ids, start, count, scale=scale, block=block, steps=steps,
                    interpret=interpret, with_lse=False)[0]


def _attention_fwd(q, k, v, segment_ids, start, count, scale, block, steps, interpret):
    o, lse = _forward(q, k, v, segment_ids, start, count, scale=scale, block=block, steps=steps,
                      interpret=interpret)
    return o, (q, k, v, segment_ids, start, count, o, lse)


def _attention_bwd(scale, block, steps, interpret, res, do):
    q, k, v, segment_ids, start, count, o, lse = res
    dq, dk, dv = _backward(q, k, v, segment_ids, start, count, o, lse, do, scale=scale, block=block,
                           steps=steps, interpret=interpret)
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def segment_attention(q, k, v, segment_ids, *, max_segment_len: int | None = None, block: int = 128,
                      ranges: tuple[jax.Array, jax.Array] | None = None, scale: float | None = None,
                      interpret=False):
    """Segment-restricted self-attention. q, k, v [H, S, D]; segment_ids [S] (0 = padding).

    max_segment_len: static bound on a segment's length (None: no bound, every key block is a
    candidate). ranges: `block_ranges(padded ids, block)` when several layers share the segments.
    Returns [H, S, D] in q's dtype; padding rows are zeros.
    """
    h, s, d = q.shape
    if block % LANES:
        raise ValueError(f"block must be a multiple of {LANES}, got {block}")
    if k.shape != q.shape or v.shape != q.shape or segment_ids.shape != (s,):
        raise ValueError(f"expected q, k, v [H, S, D] and segment_ids [S]; got {q.shape}, {k.shape}, {v.shape}, "
                         f"{segment_ids.shape}")
    scale = d ** -0.5 if scale is None else scale
    padded = -(-s // block) * block
    if padded != s:  # zero rows with segment 0: never attended, never NaN
        pad = ((0, 0), (0, padded - s), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, (0, padded - s))
    if ranges is None:
        ranges = block_ranges(segment_ids, block)
    elif ranges[0].shape != (padded // block,):
        raise ValueError(f"ranges are for {ranges[0].shape[0]} blocks, the sequence has {padded // block}")
    steps = max_steps(padded // block, block, max_segment_len)
    out = _attention(q, k, v, segment_ids.astype(jnp.int32), *ranges, float(scale), block, steps, interpret)
    return out[:, :s]


def flops(num_heads: int, head_dim: int, segment_lengths) -> int:
    """Useful forward FLOPs of segment attention (QK^T and PV) over the given segment lengths."""
    return 4 * num_heads * head_dim * int(sum(n * n for n in segment_lengths))

