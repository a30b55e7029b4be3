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

    def embed(self, input_ids, vision: VisionInputs | None):
        """Token embeddings [B, L, D] with vision features written into the placeholder rows."""
        x = self.language_model.embed_tokens(input_ids)
        if vision is None:
            return x
        feats = self.visual(vision).astype(x.dtype)  # [U, D]: image tokens, then video tokens
        return scatter_vision(x, input_ids, feats, self.config.image_token_id,
                              self.config.video_token_id, vision.num_image_tokens)

    def __call__(self, input_ids, position_ids, segment_ids, vision: VisionInputs | None = None):
        """input_ids [B, L]; position_ids [3, B, L]; segment_ids [B, L] (0 = padding) -> logits [B, L, V]."""
        h, _ = self.language_model(self.embed(input_ids, vision), position_ids, segment_ids)
        return self.logits(h)

    def prefill(self, input_ids, position_ids, segment_ids, vision: VisionInputs | None, cache: KVCache):
        """Writes the prompt into the cache; returns (logits of the last position [B, V], cache)."""
        h, cache = self.language_model(self.embed(input_ids, vision), position_ids, segment_ids, cache)
        return self.logits(h[:, -1]), cache

    def decode(self, tokens, position_ids, cache: KVCache):
        """tokens [B, L] (usually L = 1) at position_ids [3, B, L] -> (logits [B, L, V], cache)."""
        x = self.language_model.embed_tokens(tokens)
        h, cache = self.language_model(x, position_ids, jnp.ones(tokens.shape, jnp.int32), cache)
        return self.logits(h), cache

    def logits(self, h):
        out = self.language_model.embed_tokens.attend(h) if self.lm_head is None else self.lm_head(h)
        return constrain(out, "batch", *(["length"] if out.ndim == 3 else []), "vocab")


def scatter_vision(x, input_ids, feats, image_token_id: int, video_token_id: int, num_image_tokens: int):
    """Fills image placeholders with feats[:num_image_tokens] and video placeholders with the rest,
    each in row-major order over the batch (as masked_scatter does). Counts are checked on the host."""
    b, length, d = x.shape
    ids = input_ids.reshape(-1)
    is_img, is_vid = ids == image_token_id, ids == video_token_id
    idx = jnp.where(is_img, jnp.cumsum(is_img) - 1, jnp.cumsum(is_vid) - 1 + num_image_tokens)
    rows = feats[jnp.clip(idx, 0, feats.shape[0] - 1)]
    return jnp.where((is_img | is_vid)[:, None], rows, x.reshape(-1, d)).reshape(b, length, d)
