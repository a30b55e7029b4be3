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


def _per_row(value, rows: int):
    """A sampling value given once (scalar) or per row ([B]) -> [B, 1], to broadcast over the vocab."""
    return jnp.broadcast_to(jnp.asarray(value), (rows,))[:, None]


def apply_repetition_penalty(logits, seen, penalty):
    """logits [B, V]; seen [B, V] bool (tokens in the prompt or generated): divide positive logits
    by the penalty, multiply negative ones (CTRL's rule, as transformers applies it). penalty: one
    value or one per row (1 leaves a row unchanged, exactly)."""
    penalty = _per_row(penalty, logits.shape[0])
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits, k):
    """Keeps the k largest logits per row (ties at the k-th value kept); k <= 0 keeps all. k: one
    value or one per row."""
    vocab = logits.shape[-1]
    k = _per_row(k, logits.shape[0])
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1), vocab - jnp.clip(k, 1, vocab), axis=-1)
    return jnp.where((k > 0) & (logits < kth), _NEG_INF, logits)


def top_p_filter(logits, p):
    """Keeps the smallest set of most likely tokens whose probability reaches p (at least one).
    p: one value or one per row (1 keeps all)."""
    p = _per_row(p, logits.shape[0])
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - p).at[..., -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
    return jnp.where((p < 1) & remove, _NEG_INF, logits)


def sample(logits, key, seen, *, temperature, top_k, top_p, repetition_penalty):
    """logits [B, V] -> tokens [B] int32.

    Each sampling value is one scalar for the batch (generate) or one per row (the server's slots);
    key is one key for the batch or one per row ([B] keys, each row drawn with its own). Each stage
    sits behind a `lax.cond` on whether any row uses it, so a disabled stage (greedy, no penalty,
    no top-k/top-p) costs nothing at run time: the sorts over the vocabulary only run when used.
    """
    b = logits.shape[0]
    t = _per_row(temperature, b)
    logits = logits.astype(jnp.float32)
    logits = jax.lax.cond(jnp.any(jnp.asarray(repetition_penalty) != 1),
                          lambda x: apply_repetition_penalty(x, seen, repetition_penalty), lambda x: x, logits)

    def greedy(x):
        return jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(x):
        y = x / jnp.where(t > 0, t, 1)
        y = jax.lax.cond(jnp.any(jnp.asarray(top_k) > 0), lambda z: top_k_filter(z, top_k), lambda z: z, y)
        y = jax.lax.cond(jnp.any(jnp.asarray(top_p) < 1), lambda z: top_p_filter(z, top_p), lambda z: z, y)
        if jnp.ndim(key) == 0:  # one key for the batch
            drawn = jax.random.categorical(key, y, axis=-1)
        else:
            drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, y)
        return jnp.where(t[:, 0] > 0, drawn.astype(jnp.int32), greedy(x))

    return jax.lax.cond(jnp.any(t > 0), draw, greedy, logits)
