"""The decoder's causal attention over packed sequences on TPU: JAX's splash attention.

Splash attention skips the key blocks its mask rules out (everything above the causal diagonal)
and applies segment ids inside the blocks it computes, so packed samples never see each other.
Grouped-query attention runs the multi-query kernel once per kv head (vmapped), with that kv
head's group of query heads. Sequences are padded to the block size with segment 0 (real tokens
never attend to it; padding rows attend causally among themselves, so no row is empty).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

BLOCK = 128


@functools.lru_cache(maxsize=32)
def _kernel(length: int, group: int, interpret: bool):
    """One causal multi-query kernel per (padded length, query heads per kv head); its mask
    metadata is computed on the host once."""
    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * group)
    block = min(BLOCK, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask arrays even when first built under jit (cached)
        return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def causal_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """q [B, L, H, D]; k, v [B, L, K, D] (H % K == 0); segment_ids [B, L] -> [B, L, H, D] in q's dtype."""
    b, length, h, d = q.shape
    kv = k.shape[2]
    padded = -(-length // BLOCK) * BLOCK
    if padded != length:
        pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - length)))
    kernel = _kernel(padded, h // kv, bool(interpret))
    # [B, K, G, L, D] queries (scaled: splash does not scale), [B, K, L, D] keys and values.
    qg = (q * d ** -0.5).astype(q.dtype).reshape(b, padded, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_row(qr, kr, vr, seg):
        ids = splash.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kg, vg, segment_ids.astype(jnp.int32))  # [B, K, G, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, padded, h, d)[:, :length].astype(q.dtype)
