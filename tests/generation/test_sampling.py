"""Sampling transforms against transformers' own logits processors and a numpy nucleus."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from qwenvl_jax.generation.sampling import SamplingParams, apply_repetition_penalty, sample, top_k_filter, top_p_filter

RNG = np.random.default_rng(0)
LOGITS = RNG.standard_normal((4, 50)).astype(np.float32) * 3


def _kept(x):
    return np.isfinite(np.asarray(x))


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_matches_transformers(k):
    ref = TopKLogitsWarper(k)(None, torch.tensor(LOGITS)).numpy()
    assert (_kept(top_k_filter(jnp.asarray(LOGITS), jnp.int32(k))) == _kept(ref)).all()


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_nucleus(p):
    got = _kept(top_p_filter(jnp.asarray(LOGITS), jnp.float32(p)))
    ref = _kept(TopPLogitsWarper(p)(None, torch.tensor(LOGITS)).numpy())
    assert (got == ref).all()
    if p > 0.99:
        return  # numpy's float64 cumsum and float32 disagree on near-boundary tails; HF agrees above
    # numpy: the smallest set of most likely tokens whose probability reaches p
    probs = np.exp(LOGITS - LOGITS.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row, keep in zip(probs, got):
        order = np.argsort(-row)
        n = int(np.searchsorted(np.cumsum(row[order]), p) + 1)
        assert set(np.flatnonzero(keep)) == set(order[:n].tolist())


def test_filters_off():
    assert _kept(top_k_filter(jnp.asarray(LOGITS), jnp.int32(0))).all()
    assert _kept(top_p_filter(jnp.asarray(LOGITS), jnp.float32(1.0))).all()


def test_repetition_penalty_matches_transformers():
    seen_ids = torch.tensor([[1, 5, 7], [0, 0, 49], [3, 4, 5], [10, 11, 12]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, torch.tensor(LOGITS)).numpy()
    seen = np.zeros(LOGITS.shape, bool)
    np.put_along_axis(seen, seen_ids.numpy(), True, axis=1)
    got = apply_repetition_penalty(jnp.asarray(LOGITS), jnp.asarray(seen), jnp.float32(1.3))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)


_SAMPLE = jax.jit(sample)  # one compile; every knob is a traced value


def _sample(params: SamplingParams, seed: int):
    seen = jnp.zeros(LOGITS.shape, bool)
    return np.asarray(_SAMPLE(jnp.asarray(LOGITS), jax.random.key(seed), seen, **params.as_arrays()))


def test_top_k_1_is_greedy_and_seed_reproduces():
    greedy = _sample(SamplingParams(), 0)
    assert greedy.tolist() == LOGITS.argmax(1).tolist()
    for seed in range(5):
        assert _sample(SamplingParams(temperature=1.5, top_k=1), seed).tolist() == greedy.tolist()
    a = _sample(SamplingParams(temperature=1.0, top_p=0.9), 3)
    assert a.tolist() == _sample(SamplingParams(temperature=1.0, top_p=0.9), 3).tolist()
    draws = {tuple(_sample(SamplingParams(temperature=1.0), s)) for s in range(20)}
    assert len(draws) > 1  # sampling really samples


def test_samples_stay_in_the_nucleus():
    keep = _kept(top_p_filter(jnp.asarray(LOGITS), jnp.float32(0.5)))
    for seed in range(30):
        tok = _sample(SamplingParams(temperature=1.0, top_p=0.5), seed)
        assert keep[np.arange(4), tok].all()


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                                 dict(repetition_penalty=0)])
def test_invalid_params(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad).validate()


def test_per_row_values_and_keys_sample_each_row_as_it_would_alone():
    """The server's form: one value and one key per row. Each row's token equals that row sampled
    alone with its own values and key (greedy, penalised, top-k, top-p and plain temperature rows
    side by side)."""
    rows = [SamplingParams(), SamplingParams(repetition_penalty=1.4),
            SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.2, top_p=0.6)]
    seen = jnp.asarray(RNG.random(LOGITS.shape) < 0.3)
    for seed in range(6):
        keys = jax.random.split(jax.random.key(seed), len(rows))
        values = {name: jnp.stack([p.as_arrays()[name] for p in rows]) for name in rows[0].as_arrays()}
        together = np.asarray(_SAMPLE(jnp.asarray(LOGITS), keys, seen, **values))
        alone = [int(_SAMPLE(jnp.asarray(LOGITS[r:r + 1]), keys[r], seen[r:r + 1], **p.as_arrays())[0])
                 for r, p in enumerate(rows)]
        assert together.tolist() == alone
    penalised = apply_repetition_penalty(jnp.asarray(LOGITS), seen, jnp.float32(1.4))
    assert together[1] == int(np.argmax(np.asarray(penalised)[1]))  # the penalty row is greedy on penalised logits
