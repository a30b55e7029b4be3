"""The Qwen2.5 text decoder: GQA attention with q/k/v bias and MRoPE, SwiGLU MLP, RMSNorm.

SPEC section 4. Shapes: B batch, L new tokens, S cache slots, D width, H query heads, K kv heads,
hd head dim. With a KVCache, the L new tokens are written at slots [index, index + L) and attend
causally (by slot) to every filled slot of their row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from qwenvl_jax.config import TextConfig
from qwenvl_jax.kernels.sharded import resolve_impl, sharded_causal_attention
from qwenvl_jax.model.attention import attend
from qwenvl_jax.model.layers import MLP, Embed, Linear, RMSNorm, scan_layers, stack_layers
from qwenvl_jax.model.rope import apply_rotary, mrope_cos_sin
from qwenvl_jax.sharding import constrain

HIDDEN = ("batch", "length", "act_embed")


@struct.dataclass
class KVCache:
    k: jax.Array  # [layers, B, S, K, hd]
    v: jax.Array  # [layers, B, S, K, hd]
    segment_ids: jax.Array  # [B, S] 1 = filled slot, 0 = empty or padding
    index: jax.Array  # [] int32: next slot to write

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, slots: int, dtype) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, slots), jnp.int32), index=jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, attention_impl: str = "auto"):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        hd = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=True, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True, axes=("embed", "kv_heads"),
                             **kw)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True, axes=("embed", "kv_heads"),
                             **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False, axes=("heads", "embed"), **kw)
        self.head_dim = hd
        self.attention_impl = attention_impl

    def __call__(self, x, cos, sin, segment_ids, cache=None, prefill: bool = False):
        """x [B, L, D]. cache: None, or (k [B, S, K, hd], v, kv_segment_ids [B, S], index).
        prefill: the cache holds nothing before these tokens (generation's first step), so they
        attend only among themselves: the causal kernel's path, no [L, S] scores."""
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, -1, self.head_dim)  # [B, L, H, hd]
        k = self.k_proj(x).reshape(b, length, -1, self.head_dim)  # [B, L, K, hd]
        v = self.v_proj(x).reshape(b, length, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = constrain(q, "batch", "length", "heads", "head_dim")
        k = constrain(k, "batch", "length", "kv_heads", "head_dim")
        v = constrain(v, "batch", "length", "kv_heads", "head_dim")
        if cache is None:  # a whole (packed) sequence: the training / scoring path
            return self.o_proj(self._causal(q, k, v, segment_ids).reshape(b, length, -1)), None
        ck, cv, kv_segment_ids, index = cache
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        if prefill:  # k, v rounded through the cache's dtype, as every later step reads them
            out = self._causal(q, k.astype(ck.dtype).astype(q.dtype), v.astype(cv.dtype).astype(v.dtype), segment_ids)
        else:
            q_slots = jnp.broadcast_to(index + jnp.arange(length, dtype=jnp.int32), (b, length))
            out = attend(q, ck.astype(q.dtype), cv.astype(v.dtype), q_segment_ids=segment_ids,
                         kv_segment_ids=kv_segment_ids, causal=True, q_positions=q_slots)
        return self.o_proj(out.reshape(b, length, -1)), (ck, cv)

    def _causal(self, q, k, v, segment_ids):
        """Causal attention of a sequence to itself: the kernel on TPU, else XLA."""
        if resolve_impl(self.attention_impl) == "pallas":
            return sharded_causal_attention(q, k, v, segment_ids)
        return attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=True)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs, param_dtype, dtype, attention_impl: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs, attention_impl=attention_impl, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, segment_ids, cache=None, prefill: bool = False):
        h, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, cache, prefill)
        x = x + h
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), *HIDDEN), new_cache


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 attention_impl: str = "auto"):
        kw = dict(param_dtype=param_dtype, dtype=dtype)
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r, attention_impl=attention_impl, **kw),
                                   cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)

    def __call__(self, x, position_ids, segment_ids, cache: KVCache | None = None, prefill: bool = False):
        """x [B, L, D] input embeddings; position_ids [3, B, L]; segment_ids [B, L] (0 = padding).
        prefill: `cache` is empty (static; see Attention).

        Returns (hidden [B, L, D], updated cache or None).
        """
        cfg = self.cfg
        x = constrain(x, *HIDDEN)
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        if cache is None:
            x, _ = scan_layers(self.layers, lambda layer, h, _: layer(h, cos, sin, segment_ids), x)
            return self.norm(x), None
        kv_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids, cache.index, axis=1)

        def body(layer, h, kv):
            return layer(h, cos, sin, segment_ids, (kv[0], kv[1], kv_seg, cache.index), prefill)

        x, (k, v) = scan_layers(self.layers, body, x, (cache.k, cache.v))
        new_cache = KVCache(k=k, v=v, segment_ids=kv_seg, index=cache.index + x.shape[1])
        return self.norm(x), new_cache
