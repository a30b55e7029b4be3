"""The Pallas kernels run per shard of the active mesh, and know which chip they compile for.

GSPMD cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"), so
on a mesh that splits what a kernel reads, each kernel runs inside `jax.shard_map` on the local
block of its operands: rows of a batch over the batch axes (data, fsdp), heads over `tensor`. The
sequence is never split (a kernel needs whole segments): a rule that shards "length" is gathered
at the kernel's boundary.

Whether a kernel is interpreted (plain XLA, any backend) or lowered to Mosaic is decided by the
platform of the devices the program is compiled for, the active layout's mesh, not by
`jax.default_backend()`: a deviceless compile for a TPU topology runs with the CPU as default
backend and must still get the real kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenvl_jax.sharding import Layout, active_layout, spec_axes


def kernel_platform() -> str:
    """The platform of the program being traced: the active layout's devices, else the default backend."""
    layout = active_layout()
    platform = None if layout is None else layout.platform
    return platform or jax.default_backend()


def resolve_impl(impl: str) -> str:
    """'auto' -> the Pallas kernels when compiling for TPU, XLA elsewhere."""
    if impl == "auto":
        return "pallas" if kernel_platform() == "tpu" else "xla"
    return impl


def interpret_kernels() -> bool:
    """Pallas TPU kernels run in interpret mode when the program is not compiled for a TPU."""
    return kernel_platform() != "tpu"


def _partitioned(layout: Layout | None) -> bool:
    return layout is not None and layout.size > 1


def _shard_map(fn, layout: Layout, in_specs, out_specs):
    # check_vma off: pallas_call has no replication rule; the specs below are exact by construction.
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def sharded_causal_attention(q, k, v, segment_ids):
    """`causal_attention` (splash) per shard: q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L].

    Batch rows split like the activations, query heads over their mesh axes. When the kv heads do
    not divide over those axes (3B: 2 kv heads on tensor=4) each kv head is repeated just enough
    (lcm(K, n) / K times, consecutively) that every shard's query heads find their kv heads in
    its own block; grouped-query order is kept (query head h still reads original kv head h // G).
    """
    from qwenvl_jax.kernels.causal_attention import causal_attention  # Pallas: imported when used

    layout = active_layout()
    interpret = interpret_kernels()
    if not _partitioned(layout):
        return causal_attention(q, k, v, segment_ids, interpret=interpret)
    kv = k.shape[2]
    spec = layout.spec(("batch", "length", "heads", "head_dim"), q.shape)
    rows, heads = spec[0], spec[2]
    n = math.prod(layout.mesh.shape[a] for a in spec_axes(heads))
    if kv % n:  # n divides h (the heads rule only keeps divisible axes), so lcm(kv, n) divides h too
        repeat = math.lcm(kv, n) // kv
        k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
    qkv_spec, seg_spec = P(rows, None, heads, None), P(rows, None)

    def local(q, k, v, seg):
        return causal_attention(q, k, v, seg, interpret=interpret)

    return _shard_map(local, layout, (qkv_spec, qkv_spec, qkv_spec, seg_spec), qkv_spec)(q, k, v, segment_ids)


def _fold(t):
    """[R, S, H, D] rows of slots -> [H, R*S, D]: one sequence per shard, heads first."""
    r, s = t.shape[:2]
    return t.reshape(r * s, *t.shape[2:]).transpose(1, 0, 2)


def fold_segments(segment_ids):
    """[R, S] per-row segment ids -> [R*S] ids distinct across rows (0 stays padding)."""
    r, s = segment_ids.shape
    offset = (jnp.arange(r, dtype=jnp.int32) * (s + 1))[:, None]
    return jnp.where(segment_ids > 0, segment_ids + offset, 0).reshape(-1)


def _row_spec(layout: Layout, segment_ids) -> P:
    return P(layout.spec(("batch", "length"), segment_ids.shape)[0], None)


def vision_segment_ranges(segment_ids, block: int):
    """The kernel's key-block ranges of [R, S] row segments, per shard of rows: computed once and
    shared by every ViT layer that attends over the same segments. Returns (start, count), each
    [shards * blocks per shard], split over the rows' mesh axes."""
    from qwenvl_jax.kernels import window_attention

    layout = active_layout()

    def local(seg):
        return window_attention.segment_ranges(fold_segments(seg), block)

    if not _partitioned(layout):
        return local(segment_ids)
    rows = _row_spec(layout, segment_ids)
    out = P(rows[0])
    return _shard_map(local, layout, (rows,), (out, out))(segment_ids)


def vision_segment_attention(q, k, v, segment_ids, *, max_segment_len: int, block: int, ranges=None):
    """`segment_attention` over rows of ViT slots, per shard: q, k, v [R, S, H, D], segment_ids
    [R, S] (0 = padding), ranges from `vision_segment_ranges` (or None). Each shard folds its rows
    into one sequence (segments never cross rows), heads split over their mesh axes.
    Returns [R, S, H, D]; padding slots are zeros."""
    from qwenvl_jax.kernels import window_attention

    layout = active_layout()
    interpret = interpret_kernels()

    def local(q, k, v, seg, *ranges):
        r, s, h, d = q.shape
        out = window_attention.segment_attention(_fold(q), _fold(k), _fold(v), fold_segments(seg),
                                                 max_segment_len=max_segment_len, block=block,
                                                 ranges=ranges or None, interpret=interpret)
        return out.transpose(1, 0, 2).reshape(r, s, h, d)

    extra = () if ranges is None else tuple(ranges)
    if not _partitioned(layout):
        return local(q, k, v, segment_ids, *extra)
    rows = _row_spec(layout, segment_ids)[0]
    heads = layout.spec(("batch", "length", "vision_heads", "head_dim"), q.shape)[2]
    qkv_spec = P(rows, None, heads, None)
    in_specs = (qkv_spec, qkv_spec, qkv_spec, P(rows, None)) + (P(rows),) * len(extra)
    return _shard_map(local, layout, in_specs, qkv_spec)(q, k, v, segment_ids, *extra)
