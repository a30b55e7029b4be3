"""Qwen2.5-VL: vision tower -> embeddings scattered into the placeholder rows -> decoder -> logits."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.model.decoder import KVCache, TextModel
from qwenvl_jax.model.layers import Linear
from qwenvl_jax.model.vision import VisionTransformer
from qwenvl_jax.model.vision_layout import VisionInputs
from qwenvl_jax.sharding import constrain


class Qwen25VL(nnx.Module):
    def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.config = config
        self.visual = VisionTransformer(config.vision, attention_impl=config.attention_impl, **kw)
        self.language_model = TextModel(config.text, attention_impl=config.attention_impl, **kw)
        t = config.text
        self.lm_head = None if config.tie_word_embeddings else Linear(t.hidden_size, t.vocab_size, bias=False,
                                                                      axes=("embed", "vocab"), **kw)

    def embed(self, input_ids, vision: VisionInputs | None, vision_token_index=None):
        """Token embeddings [B, L, D] with vision features written into the placeholder rows:
        token (b, l) takes feature vision_token_index[b, l] of vision row b (or of the only row)."""
        x = self.language_model.embed_tokens(input_ids)
        if vision is None:
            return x
        feats = self.visual(vision).astype(x.dtype)  # [R, U, D], R = 1 or B
        return scatter_vision(x, feats, vision_token_index)

    def __call__(self, input_ids, position_ids, segment_ids, vision: VisionInputs | None = None,
                 vision_token_index=None):
        """input_ids [B, L]; position_ids [3, B, L]; segment_ids [B, L] (0 = padding) -> logits [B, L, V]."""
        return self.logits(self.hidden(input_ids, position_ids, segment_ids, vision, vision_token_index))

    def hidden(self, input_ids, position_ids, segment_ids, vision=None, vision_token_index=None):
        """Final normed hidden states [B, L, D] (the loss computes logits in chunks from these)."""
        h, _ = self.language_model(self.embed(input_ids, vision, vision_token_index), position_ids, segment_ids)
        return h

    def prefill(self, input_ids, position_ids, segment_ids, vision: VisionInputs | None, vision_token_index,
                cache: KVCache, layers=None):
        """Writes the prompt into an empty cache; returns (logits of the last position [B, V], cache).
        layers: the decoder layers as separate modules (TextModel.__call__)."""
        x = self.embed(input_ids, vision, vision_token_index)
        h, cache = self.language_model(x, position_ids, segment_ids, cache, prefill=True, layers=layers)
        return self.logits(h[:, -1]), cache

    def decode(self, tokens, position_ids, cache: KVCache, layers=None):
        """tokens [B, L] (usually L = 1) at position_ids [3, B, L] -> (logits [B, L, V], cache)."""
        x = self.language_model.embed_tokens(tokens)
        h, cache = self.language_model(x, position_ids, jnp.ones(tokens.shape, jnp.int32), cache, layers=layers)
        return self.logits(h), cache

    def logits(self, h):
        out = self.language_model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return constrain(out, "batch", *(["length"] if out.ndim == 3 else []), "vocab")


def scatter_vision(x, feats, index):
    """x [B, L, D]; feats [R, U, D] with R = B (row b's features) or R = 1 (shared by all rows);
    index [B, L]: the feature each token takes, -1 for none. Index arrays are built and checked
    on the host (vision_layout.token_index, the data pipeline's packer)."""
    if feats.shape[0] != x.shape[0]:
        feats = jnp.broadcast_to(feats, (x.shape[0], *feats.shape[1:]))
    rows = jnp.take_along_axis(feats, jnp.clip(index, 0, feats.shape[1] - 1)[..., None], axis=1)
    return jnp.where((index >= 0)[..., None], rows, x)
