"""The Qwen2.5 text decoder: GQA attention with q/k/v bias and MRoPE, SwiGLU MLP, RMSNorm.

SPEC section 4. Shapes: B batch, L new tokens, S cache slots, D width, H query heads, K kv heads,
hd head dim. With a KVCache, the L new tokens are written at slots [index, index + L) and attend
causally (by slot) to every filled slot of their row.

With a cache the layers run unrolled, one cache buffer per layer: each layer writes its new k/v
into its own (donated) buffer in place and attention reads that buffer as it lies. A stacked
[layers, ...] cache threaded through the layer scan was copied per layer and step (XLA cannot
update a scanned operand in place), which made a decode step grow with the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from qwenvl_jax.config import TextConfig
from qwenvl_jax.kernels.sharded import resolve_impl, sharded_causal_attention
from qwenvl_jax.model.attention import attend, attend_cache, cache_masks, causal_blocked
from qwenvl_jax.model.layers import MLP, Embed, Linear, RMSNorm, scan_layers, stack_layers
from qwenvl_jax.model.rope import apply_rotary, mrope_cos_sin
from qwenvl_jax.sharding import constrain

HIDDEN = ("batch", "length", "act_embed")
PREFILL_BLOCK = 256  # query/key block of the XLA prefill's causal attention (see causal_blocked)


# One layer's cache buffers, in the layouts the two attention matmuls read without a transpose:
# scores contract k over head_dim (k stored [B, K, hd, S]), the output contracts v over slots.
K_CACHE_AXES = ("batch", "kv_heads", "head_dim", "length")
V_CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, hd, S]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, hd]
    segment_ids: jax.Array  # [B, S] 1 = filled slot, 0 = empty or padding
    index: jax.Array  # [] int32: next slot to write

    @staticmethod
    def layer_shapes(cfg: TextConfig, batch: int, slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one layer's k and v buffers."""
        k, hd = cfg.num_key_value_heads, cfg.head_dim
        return (batch, k, hd, slots), (batch, k, slots, hd)

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, slots: int, dtype) -> KVCache:
        k_shape, v_shape = cls.layer_shapes(cfg, batch, slots)
        n = cfg.num_hidden_layers
        return cls(k=tuple(jnp.zeros(k_shape, dtype) for _ in range(n)),
                   v=tuple(jnp.zeros(v_shape, dtype) for _ in range(n)),
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
        """x [B, L, D]. cache: None, or (k [B, K, hd, S], v [B, K, S, hd], masks, index) with masks =
        (which cache slots [B, L, S] and which new tokens [B, L, L] each new token sees).
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
        ck, cv, masks, index = cache
        # The cache stays in its declared sharding inside the decode loop too: when the kv heads do
        # not divide the tensor axis XLA otherwise splits it over kv heads in the loop and gathers
        # the whole cache back at every call's exit (tests/test_aot.py).
        ck, cv = constrain(ck, *K_CACHE_AXES), constrain(cv, *V_CACHE_AXES)
        # k, v rounded through the cache's dtype, as every later step reads them
        k, v = k.astype(ck.dtype).astype(q.dtype), v.astype(cv.dtype).astype(v.dtype)
        if prefill:
            out = self._causal(q, k, v, segment_ids, inference=True)
        else:  # the cache as it was before this step, and the new tokens beside it; only its first
            # b rows when fewer rows decode than the cache holds (a server's busy slots)
            out = attend_cache(q, ck[:b], cv[:b], k, v, *masks)
        # Then only the L new slots of the b rows are written, in place: the rest of the donated
        # buffer stays where it is. (Attention reading the updated buffer made XLA:CPU fuse the
        # update into the matmul's operand too and copy the whole cache to keep both.)
        if not prefill:
            k, v = after(k, out), after(v, out)
        zero = jnp.zeros((), jnp.int32)
        index = jnp.asarray(index, jnp.int32)
        ck = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 3, 1).astype(ck.dtype), (zero, zero, zero, index))
        cv = jax.lax.dynamic_update_slice(cv, v.swapaxes(1, 2).astype(cv.dtype), (zero, zero, index, zero))
        ck, cv = constrain(ck, *K_CACHE_AXES), constrain(cv, *V_CACHE_AXES)
        return self.o_proj(out.reshape(b, length, -1)), (ck, cv)

    def _causal(self, q, k, v, segment_ids, inference: bool = False):
        """Causal attention of a sequence to itself: the kernel on TPU, else XLA (for a long prompt
        at inference, blocks that skip the masked half)."""
        if resolve_impl(self.attention_impl) == "pallas":
            return sharded_causal_attention(q, k, v, segment_ids)
        if inference and q.shape[1] > 2 * PREFILL_BLOCK:  # shorter: the dense path is as fast
            return causal_blocked(q, k, v, segment_ids, PREFILL_BLOCK)
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

    def __call__(self, x, position_ids, segment_ids, cache: KVCache | None = None, prefill: bool = False,
                 layers: list[DecoderLayer] | None = None):
        """x [B, L, D] input embeddings; position_ids [3, B, L]; segment_ids [B, L] (0 = padding).
        prefill: `cache` is empty (static; see Attention). layers: with a cache, the layers as
        separate modules (`unstack_layers`); default: sliced from the stacked ones here.

        Returns (hidden [B, L, D], updated cache or None).
        """
        cfg = self.cfg
        x = constrain(x, *HIDDEN)
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        if cache is None:
            x, _ = scan_layers(self.layers, lambda layer, h, _: layer(h, cos, sin, segment_ids), x)
            return self.norm(x), None
        b = x.shape[0]  # may be fewer rows than the cache holds: its first b rows decode
        masks = None if prefill else cache_masks(segment_ids, cache.segment_ids[:b])
        layers = unstack_layers(self.layers) if layers is None else layers
        ks, vs = [], []
        for layer, ck, cv in zip(layers, cache.k, cache.v, strict=True):
            x, (ck, cv) = layer(x, cos, sin, segment_ids, (ck, cv, masks, cache.index), prefill)
            ks.append(ck)
            vs.append(cv)
        kv_seg = jax.lax.dynamic_update_slice(cache.segment_ids, after(segment_ids, x).astype(cache.segment_ids.dtype),
                                              (jnp.zeros((), jnp.int32), jnp.asarray(cache.index, jnp.int32)))
        new_cache = KVCache(k=tuple(ks), v=tuple(vs), segment_ids=kv_seg, index=cache.index + x.shape[1])
        return self.norm(x), new_cache


def after(x, dep):
    """x, made to depend on `dep` (plus an exact zero computed from one element of it). A write into
    a buffer that is also read unordered with it makes XLA copy the buffer (it cannot tell which runs
    first); with the write depending on the read's result, the read runs first and the write is in
    place. (An optimization barrier orders them too, but XLA then copies the buffers.) The zero is
    (e != e) * 0, not e * 0, so a NaN or inf in one row cannot reach the other rows' cache."""
    e = dep.reshape(-1)[0]
    return x + (e != e).astype(x.dtype) * 0


def unstack_layers(stacked: nnx.Module, layer_states=None) -> list[nnx.Module]:
    """The stacked layers as separate modules: from per-layer states (`layer_states`, sliced once
    outside the step) or by static slices of the stacked params (free on TPU, where a slice fuses
    into the matmul that reads it)."""
    graphdef, state = nnx.split(stacked)
    if layer_states is None:
        n = jax.tree.leaves(state)[0].shape[0]
        layer_states = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]
    return [nnx.merge(graphdef, s) for s in layer_states]
