"""Continuous batching against generate: requests of different lengths and budgets, more of them
than slots, inserted while others decode, each get exactly what generate gives them alone."""

import numpy as np
import pytest

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.generation.decode import ContextLengthError, generate
from qwenvl_jax.generation.sampling import SamplingParams
from qwenvl_jax.pretrained import init_model
from qwenvl_jax.serve.engine import Engine, Request, warm_up

EOS, PAD = 7, 0


@pytest.fixture(scope="module")
def model():
    return init_model(Qwen25VLConfig.from_preset("tiny"), dtype="float32", seed=3)


def _prompt(length, seed):
    return np.random.default_rng(seed).integers(10, 500, length)[None]


def _serve(engine, requests):
    """Submits (inputs, max_tokens, sampling, seed) requests; returns each one's (tokens, finish reason)."""
    results = [([], []) for _ in requests]
    for (inputs, max_tokens, sampling, seed), (tokens, reason) in zip(requests, results):
        engine.submit(Request(inputs, max_tokens=max_tokens, sampling=sampling, seed=seed,
                              on_token=tokens.append, on_finish=reason.append))
    engine.run_until_idle()
    return [(tokens, reason[0]) for tokens, reason in results]


def test_greedy_requests_equal_generate_alone(model):
    # two prompt buckets (16, 20) and one cache bucket for generate (28 slots): few compiles
    lengths, budgets = [5, 19, 9, 3, 17, 14, 20], [12, 8, 10, 9, 5, 11, 7]
    requests = [(model.prepare(input_ids=_prompt(n, i)), m, SamplingParams(), None)
                for i, (n, m) in enumerate(zip(lengths, budgets))]
    engine = Engine(model, max_batch=3, max_seq_len=96, eos_token_ids=[EOS], pad_token_id=PAD, steps_per_call=3)
    served = _serve(engine, requests)
    for (inputs, m, _, _), (tokens, reason) in zip(requests, served):
        ref = generate(model, inputs, max_new_tokens=m, eos_token_ids=[EOS], pad_token_id=PAD).token_ids[0]
        assert tokens == ref
        assert reason == ("stop" if ref[-1] == EOS else "length")
    assert engine.busy_slots == 0


def test_a_seeded_sampled_request_does_not_depend_on_its_neighbours(model):
    sampled = (model.prepare(input_ids=_prompt(11, 100)), 10, SamplingParams(temperature=1.3, top_k=40), 1234)
    engine = Engine(model, max_batch=4, max_seq_len=64, eos_token_ids=[], pad_token_id=PAD, steps_per_call=2)
    alone = _serve(engine, [sampled])[0]
    others = [(model.prepare(input_ids=_prompt(6 + i, i)), 5 + 3 * i, SamplingParams(temperature=0.8), i)
              for i in range(3)]
    crowded = _serve(engine, [others[0], sampled, *others[1:]])[1]
    assert alone == crowded and len(alone[0]) == 10 and alone[1] == "length"


def test_cancel_frees_the_slot_and_a_long_request_does_not_fit(model):
    engine = Engine(model, max_batch=1, max_seq_len=32, eos_token_ids=[], pad_token_id=PAD, steps_per_call=2)
    tokens, reasons = [], []
    request = Request(model.prepare(input_ids=_prompt(4, 1)), max_tokens=20, on_token=tokens.append,
                      on_finish=reasons.append)
    request.on_token = lambda t: (tokens.append(t), len(tokens) == 3 and request.cancel())
    engine.submit(request)
    after = (model.prepare(input_ids=_prompt(5, 2)), 4, SamplingParams(), None)
    engine.submit(Request(after[0], max_tokens=4, on_token=lambda t: None, on_finish=reasons.append))
    engine.run_until_idle()
    assert reasons == ["cancelled", "length"] and len(tokens) == 3
    with pytest.raises(ContextLengthError, match="exceeds --max-seq-len"):
        engine.submit(Request(model.prepare(input_ids=_prompt(30, 3)), max_tokens=3))


def test_the_step_updates_the_ring_in_place(model):
    """The engine's decode call is generation's copy-free step: the donated state's cache is aliased
    to the output and the temporaries stay below one layer's k buffer (a copy of the cache, per
    layer or stacked, would need at least that). A step over fewer rows (one busy slot of 8) is
    aliased whole too, and holds at most its rows' share of the cache (XLA:CPU copies that prefix
    out before the attention matmuls)."""
    from qwenvl_jax.model.decoder import KVCache

    slots, batch = 512, 8
    engine = Engine(model, max_batch=batch, max_seq_len=slots, eos_token_ids=[], pad_token_id=PAD, steps_per_call=2)
    _serve(engine, [(model.prepare(input_ids=_prompt(5, 0)), 3, SamplingParams(), None)])
    (step,) = engine._step._compiled.values()
    (one_row,) = engine._step_rows._compiled.values()
    k_shape, _ = KVCache.layer_shapes(model.config.text, batch, slots)
    layer_bytes = int(np.prod(k_shape)) * 4
    cache_bytes = 2 * model.config.text.num_hidden_layers * layer_bytes
    memory = step.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < layer_bytes, (memory.temp_size_in_bytes, layer_bytes)
    memory = one_row.memory_analysis()
    assert memory.alias_size_in_bytes >= cache_bytes
    assert memory.temp_size_in_bytes < cache_bytes / batch + layer_bytes / 4, (memory.temp_size_in_bytes, cache_bytes)


def test_fewer_busy_slots_decode_fewer_rows_with_the_same_answers(model, monkeypatch):
    """A decode call runs the rows up to the last busy slot (1, 2 or all 8 here): a lone request
    does not read the idle rows' cache, and nobody's tokens change with the row count."""
    engine = Engine(model, max_batch=8, max_seq_len=64, eos_token_ids=[], pad_token_id=PAD, steps_per_call=2)
    assert engine.row_counts() == [1, 2, 8]
    rows_run = []
    real = engine._decode
    monkeypatch.setattr(engine, "_decode", lambda rows: (rows_run.append(rows), real(rows)))
    requests = [(model.prepare(input_ids=_prompt(4 + i, 40 + i)), 4 + 3 * (i % 3), SamplingParams(), None)
                for i in range(6)]
    served = _serve(engine, requests[:1]) + _serve(engine, requests[1:3]) + _serve(engine, requests[3:])
    assert set(rows_run) == {1, 2, 8}
    for (inputs, m, _, _), (tokens, _) in zip(requests, served, strict=True):
        assert tokens == generate(model, inputs, max_new_tokens=m, eos_token_ids=[], pad_token_id=PAD).token_ids[0]


def test_a_failing_request_fails_alone_and_its_slot_is_reused(model, monkeypatch):
    """An unexpected error in one request's prefill reaches only that request (the server's 500);
    the others are served and the slot is free again."""
    engine = Engine(model, max_batch=1, max_seq_len=64, eos_token_ids=[EOS], pad_token_id=PAD, steps_per_call=2)
    real = engine._prefill_into
    broken = model.prepare(input_ids=_prompt(6, 9))

    def prefill_into(admission):
        if admission.inputs is broken:
            raise RuntimeError("device fell over")
        return real(admission)

    monkeypatch.setattr(engine, "_prefill_into", prefill_into)
    errors, reasons, tokens = [], [], []
    engine.submit(Request(broken, max_tokens=3, on_error=errors.append, on_finish=reasons.append))
    good = model.prepare(input_ids=_prompt(6, 10))
    engine.submit(Request(good, max_tokens=3, on_token=tokens.append, on_finish=reasons.append))
    engine.run_until_idle()
    ref = generate(model, good, max_new_tokens=3, eos_token_ids=[EOS], pad_token_id=PAD).token_ids[0]
    assert [str(e) for e in errors] == ["device fell over"] and engine.busy_slots == 0
    assert tokens == ref and reasons == ["stop" if ref[-1] == EOS else "length"]


def test_a_prompt_whose_bucket_passes_the_ring_is_padded_only_to_the_ring(model):
    engine = Engine(model, max_batch=1, max_seq_len=30, eos_token_ids=[EOS], pad_token_id=PAD, steps_per_call=1)
    inputs = model.prepare(input_ids=_prompt(28, 4))  # its bucket is 32 slots, the ring 30
    (tokens, _), = _serve(engine, [(inputs, 2, SamplingParams(), None)])
    assert tokens == generate(model, inputs, max_new_tokens=2, eos_token_ids=[EOS], pad_token_id=PAD).token_ids[0]


def test_warm_up_compiles_the_prefill_of_every_prompt_length_it_covers(model):
    """Prompts are padded to powers of two (never past the ring); after warm_up(max_prompt=100)
    requests of 1 to 100 tokens compile nothing, and padding changes no answer."""
    engine = Engine(model, max_batch=4, max_seq_len=128, eos_token_ids=[EOS], pad_token_id=PAD)
    assert sorted({engine.prompt_columns(n) for n in range(1, 128)}) == [16, 32, 64, 128]
    warm_up(engine, model.prepare(input_ids=_prompt(5, 0)), max_prompt=100)
    programs = (engine._prefill, engine._insert, engine._step, engine._step_rows)
    compiled = [c.compiles for c in programs]
    requests = [(model.prepare(input_ids=_prompt(n, n)), 3, SamplingParams(), None) for n in (1, 17, 40, 100)]
    served = _serve(engine, requests) + _serve(engine, requests[:1])  # 2 busy rows, then 1
    assert [c.compiles for c in programs] == compiled
    for (inputs, m, _, _), (tokens, _) in zip(requests + requests[:1], served, strict=True):
        assert tokens == generate(model, inputs, max_new_tokens=m, eos_token_ids=[EOS], pad_token_id=PAD).token_ids[0]
