"""The Qwen2.5 text decoder: GQA attention with q/k/v bias and MRoPE, SwiGLU MLP, RMSNorm.

SPEC section 4. Shapes: B batch, L tokens, D width, H query heads, K kv heads, hd head dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import TextConfig
from qwenvl_jax.model.attention import attend
from qwenvl_jax.model.layers import MLP, Embed, Linear, RMSNorm, scan_layers, stack_layers
from qwenvl_jax.model.rope import apply_rotary, mrope_cos_sin


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        hd = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=True, **kw)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True, **kw)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True, **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False, **kw)
        self.head_dim = hd

    def __call__(self, x, cos, sin, segment_ids):  # x [B, L, D]
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, -1, self.head_dim)  # [B, L, H, hd]
        k = self.k_proj(x).reshape(b, length, -1, self.head_dim)  # [B, L, K, hd]
        v = self.v_proj(x).reshape(b, length, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True)
        return self.o_proj(out.reshape(b, length, -1))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, segment_ids):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r, **kw), cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

    def __call__(self, x, position_ids, segment_ids):
        """x [B, L, D] input embeddings; position_ids [3, B, L]; segment_ids [B, L] (0 = padding)."""
        cfg = self.cfg
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        x = scan_layers(self.layers, lambda layer, h, _: layer(h, cos, sin, segment_ids), x)
        return self.norm(x)
