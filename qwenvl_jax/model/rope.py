"""Rotary embeddings: the ViT's 2-D (row, col) rotary and the LLM's multimodal RoPE (MRoPE).

Both use the split-half convention: x' = x*cos + rotate_half(x)*sin, rotate_half([a, b]) = [-b, a].
"""

from __future__ import annotations

import jax.numpy as jnp


def rotate_half(x):
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-b, a], axis=-1)


def apply_rotary(x, cos, sin):
    """x [..., N, heads, D]; cos/sin [..., N, D] broadcast over heads."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def vision_cos_sin(pos, head_dim: int, theta: float):
    """pos [..., P, 2] (row, col) -> cos, sin [..., P, head_dim] in f32 (SPEC 3.2).

    inv_freq has head_dim/4 entries; angles are [row*inv | col*inv], duplicated for the two halves.
    """
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter))
    ang = pos.astype(jnp.float32)[..., None] * inv_freq  # [..., P, 2, quarter]
    ang = jnp.concatenate([ang[..., 0, :], ang[..., 1, :]], axis=-1)  # [..., P, head_dim/2]
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section, dtype):
    """position_ids [3, B, L] (t, h, w) -> cos, sin [B, L, head_dim] in `dtype` (SPEC 4.1).

    Frequency slot j takes its angle from axis 0 for j < s0, axis 1 for s0 <= j < s0+s1, else
    axis 2: contiguous sections of one shared frequency table, then duplicated for both halves.
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, head_dim/2]
    axis_of_slot = jnp.repeat(jnp.arange(3), jnp.array(mrope_section), total_repeat_length=head_dim // 2)
    f = jnp.where(axis_of_slot == 0, freqs[0], jnp.where(axis_of_slot == 1, freqs[1], freqs[2]))
    emb = jnp.concatenate([f, f], axis=-1)
    # Computed in f32 and cast to the activation dtype before use, as the reference does.
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)
