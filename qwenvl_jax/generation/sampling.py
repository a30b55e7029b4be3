"""Next-token selection: repetition penalty, then greedy or temperature / top-k / top-p sampling.

The order is transformers' (`generate`: logits processors, then warpers temperature -> top-k ->
top-p). Every knob is a traced value, so changing them never recompiles; temperature 0 is greedy.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):  # NaN passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def as_arrays(self) -> dict:
        return dict(temperature=jnp.float32(self.temperature), top_k=jnp.int32(self.top_k),
                    top_p=jnp.float32(self.top_p), repetition_penalty=jnp.float32(self.repetition_penalty))


def apply_repetition_penalty(logits, seen, penalty):
    """logits [B, V]; seen [B, V] bool (tokens in the prompt or generated): divide positive logits
    by the penalty, multiply negative ones (CTRL's rule, as transformers applies it)."""
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits, k):
    """Keeps the k largest logits per row (ties at the k-th value kept); k <= 0 keeps all."""
    vocab = logits.shape[-1]
    kth = jnp.sort(logits, axis=-1)[..., vocab - jnp.clip(k, 1, vocab)][..., None]
    return jnp.where((k > 0) & (logits < kth), _NEG_INF, logits)


def top_p_filter(logits, p):
    """Keeps the smallest set of most likely tokens whose probability reaches p (at least one)."""
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where((p < 1) & remove, _NEG_INF, logits)


def sample(logits, key, seen, *, temperature, top_k, top_p, repetition_penalty):
    """logits [B, V] -> tokens [B] int32.

    Each stage sits behind a `lax.cond`, so a disabled stage (greedy, no penalty, no top-k/top-p)
    costs nothing at run time: the sorts over the vocabulary only run when they are used.
    """
    logits = logits.astype(jnp.float32)
    logits = jax.lax.cond(repetition_penalty != 1, lambda x: apply_repetition_penalty(x, seen, repetition_penalty),
                          lambda x: x, logits)

    def draw(x):
        x = x / temperature
        x = jax.lax.cond(top_k > 0, lambda y: top_k_filter(y, top_k), lambda y: y, x)
        x = jax.lax.cond(top_p < 1, lambda y: top_p_filter(y, top_p), lambda y: y, x)
        return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)
