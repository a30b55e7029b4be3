"""The vision tower: patch embed -> window order -> blocks (windowed / full) -> merger -> raster order.

SPEC section 3. Shapes: P patches, U = P/4 merged units, D vision width, O = LLM width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import VisionConfig
from qwenvl_jax.kernels.sharded import resolve_impl, vision_segment_attention, vision_segment_ranges
from qwenvl_jax.model.attention import attend
from qwenvl_jax.model.layers import MLP, Linear, RMSNorm, scan_layers, stack_layers
from qwenvl_jax.model.rope import apply_rotary, vision_cos_sin
from qwenvl_jax.model.vision_layout import VisionInputs
from qwenvl_jax.processing.image import CLIP_MEAN, CLIP_STD
from qwenvl_jax.sharding import constrain

VISION_EPS = 1e-6  # every vision RMSNorm, ln_q included (SPEC 10.9)
VISION_BLOCK = 128  # rows per block of the Pallas kernel: two 64-patch windows


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, attention_impl: str = "auto"):
        kw = dict(bias=True, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        # rows q | k | v, head-major; kept whole (see sharding.DEFAULT_RULES), heads split after.
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=("vision_embed", "vision_qkv"), **kw)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=("vision_heads", "vision_embed"), **kw)
        self.num_heads = cfg.num_heads
        self.attention_impl = attention_impl

    def __call__(self, x, cos, sin, segment_ids, max_segment_len: int, aligned: bool = False,
                 ranges=None, window: int | None = None):
        # x [R, S, D] rows of slots; ranges: the kernel's block ranges; window: full-attention segments
        # are runs of whole windows of this many slots (see attend)
        r, p, d = x.shape
        qkv = self.qkv(x).reshape(r, p, 3, self.num_heads, d // self.num_heads)
        q, k, v = (constrain(qkv[:, :, i], "batch", "length", "vision_heads", "head_dim") for i in range(3))
        # Rotary in f32, back to the compute dtype (SPEC 3.2).
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(v.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        if resolve_impl(self.attention_impl) == "pallas":  # per shard of rows and heads; padding rows are zeros
            out = vision_segment_attention(q, k, v, segment_ids, max_segment_len=max_segment_len, block=VISION_BLOCK,
                                           ranges=ranges)
        else:
            out = attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=False,
                         max_segment_len=max_segment_len, aligned=aligned, window=window)
        return self.proj(out.reshape(r, p, d))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, attention_impl: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, eps=VISION_EPS, **kw)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=VISION_EPS, **kw)
        self.attn = VisionAttention(cfg, rngs=rngs, attention_impl=attention_impl, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True, rngs=rngs,
                       axes=("vision_embed", "vision_mlp"), **kw)

    def __call__(self, x, cos, sin, inputs: VisionInputs, is_full, ranges=(None, None)):
        # Full-attention blocks see each whole frame group, the others one window (SPEC 3.4).
        # Rematerialised: differentiating a cond inside the layer scan would otherwise stack both
        # branches' residuals for every layer (zero-filled for the branch not taken).
        @jax.checkpoint
        def attention(h):
            return jax.lax.cond(
                is_full,
                lambda: self.attn(h, cos, sin, inputs.full_segment_ids, inputs.max_full_len, ranges=ranges[0],
                                  window=inputs.window_len),
                lambda: self.attn(h, cos, sin, inputs.window_segment_ids, inputs.window_len, aligned=True,
                                  ranges=ranges[1]))

        h = attention(self.norm1(x))
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, concat each 2x2 group (4 consecutive rows), Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        width = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=VISION_EPS, param_dtype=param_dtype, dtype=dtype)
        self.fc1 = Linear(width, width, bias=True, axes=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Linear(width, cfg.out_hidden_size, bias=True, axes=("vision_mlp", "embed"), **kw)
        self.width = width

    def __call__(self, x):  # [R, S, D] -> [R, S/4, O]
        y = self.ln_q(x).reshape(*x.shape[:-2], -1, self.width)
        return self.fc2(jax.nn.gelu(self.fc1(y), approximate=False))


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 attention_impl: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.attention_impl = attention_impl
        # Conv3d with kernel == stride over rows already flattened as (C, T, ph, pw): one matmul.
        self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, bias=False, axes=("patch", "vision_embed"),
                                  rngs=rngs, **kw)
        self.blocks = stack_layers(lambda r: VisionBlock(cfg, rngs=r, attention_impl=attention_impl, **kw),
                                   cfg.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs, **kw)

    def __call__(self, inputs: VisionInputs):  # -> [R, U, O] per row, in the processor's (raster) order
        cfg = self.cfg
        pixels = inputs.pixel_values
        if pixels.dtype == jnp.uint8:  # raw patches from the data pipeline: normalize on device
            pixels = normalize_patches(pixels, cfg)
        x = self.patch_embed(pixels)  # [R, P, D]
        r, mu, d = x.shape[0], cfg.merge_unit, x.shape[-1]
        units = jnp.concatenate([x.reshape(r, -1, mu, d), jnp.zeros((r, 1, mu, d), x.dtype)], axis=1)  # + padding
        x = jnp.take_along_axis(units, inputs.unit_index[:, :, None, None], axis=1).reshape(r, -1, d)  # [R, S, D]
        x = constrain(x, "batch", "length", "act_embed")
        cos, sin = vision_cos_sin(inputs.rotary_pos, cfg.head_dim, cfg.rope_theta)
        is_full = jnp.asarray(np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes))
        ranges = (None, None)
        if resolve_impl(self.attention_impl) == "pallas":  # block ranges once, shared by every layer
            ranges = (vision_segment_ranges(inputs.full_segment_ids, VISION_BLOCK),
                      vision_segment_ranges(inputs.window_segment_ids, VISION_BLOCK))

        def body(block, x, full):
            return block(x, cos, sin, inputs, full, ranges), None

        x, _ = scan_layers(self.blocks, body, x, is_full)
        merged = self.merger(x)  # [R, S/4, O]
        return jnp.take_along_axis(merged, inputs.reverse_index[:, :, None], axis=1)


def normalize_patches(pixels, cfg: VisionConfig):
    """uint8 patches [..., C*T*p*p] (channel-major, as the processor flattens them) -> the
    processor's normalized float32: (x / 255 - mean[c]) / std[c]."""
    per_channel = cfg.patch_dim // cfg.in_channels
    mean = jnp.repeat(jnp.asarray(CLIP_MEAN, jnp.float32), per_channel)
    std = jnp.repeat(jnp.asarray(CLIP_STD, jnp.float32), per_channel)
    return (pixels.astype(jnp.float32) * (1 / 255) - mean) / std
