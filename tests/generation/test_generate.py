"""Greedy generation equals a reference greedy decode of transformers' model, token for token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import SHAPES, TOKENS, hf_greedy, hf_logits, rel_err

from qwenvl_jax.buckets import bucket
from qwenvl_jax.generation.decode import ContextLengthError, compile_stats, generate
from qwenvl_jax.model.decoder import PREFILL_BLOCK, KVCache
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.processing.rope_index import get_rope_index

IMG, VID, VS, VE = (TOKENS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                        "vision_end_token_id"))
STEPS = 10


@pytest.fixture
def models(tiny_checkpoint, shape):
    path, hf = tiny_checkpoint(shape)
    return load_pretrained(path, dtype="float32"), hf


def _vision(tok, grid):
    return [VS] + [tok] * (int(np.prod(grid)) // 4) + [VE]


def _pixels(rng, grids):
    return rng.standard_normal((int(sum(np.prod(g) for g in grids)), 1176)).astype(np.float32)


def _left_pad(rows):
    n = max(map(len, rows))
    ids = np.array([[0] * (n - len(r)) + r for r in rows])
    mask = np.array([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _case(name, rng):
    t = lambda n: list(rng.integers(0, 400, n))  # noqa: E731
    if name == "text":
        return dict(input_ids=np.array([t(9)]))
    if name == "one_image":
        g = (1, 10, 14)
        return dict(input_ids=np.array([t(3) + _vision(IMG, g) + t(4)]), pixel_values=_pixels(rng, [g]),
                    image_grid_thw=np.array([g]))
    if name == "two_images":
        gs = [(1, 8, 12), (1, 4, 6)]
        return dict(input_ids=np.array([t(2) + _vision(IMG, gs[0]) + t(1) + _vision(IMG, gs[1]) + t(3)]),
                    pixel_values=_pixels(rng, gs), image_grid_thw=np.array(gs))
    if name == "video":
        g = (3, 8, 8)
        return dict(input_ids=np.array([t(2) + _vision(VID, g) + t(5)]), pixel_values_videos=_pixels(rng, [g]),
                    video_grid_thw=np.array([g]), second_per_grid_ts=np.array([1.5], np.float32))
    if name == "batch_of_three":
        g = (1, 6, 8)
        ids, mask = _left_pad([t(3) + _vision(IMG, g) + t(2), t(5), t(11)])
        return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(rng, [g]), image_grid_thw=np.array([g]))
    if name == "long_text_batch":  # prompts past 2 * PREFILL_BLOCK: the blocked causal prefill
        ids, mask = _left_pad([t(600), t(530)])
        return dict(input_ids=ids, attention_mask=mask)
    raise KeyError(name)


@pytest.mark.parametrize("case", ["text", "one_image", "two_images", "video", "batch_of_three"])
def test_greedy_matches_reference(models, case):
    ours, hf = models
    batch = _case(case, np.random.default_rng(7))
    inputs = ours.prepare(**batch)
    out = generate(ours, inputs, max_new_tokens=STEPS, eos_token_ids=[], pad_token_id=0)
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    vision.pop("second_per_grid_ts", None)
    ref = hf_greedy(hf, STEPS, input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=inputs.position_ids, **vision)
    assert np.array(out.token_ids).tolist() == ref.tolist()
    assert out.prompt_tokens == inputs.segment_ids.sum(1).tolist()


def test_long_prefill_logits_match_reference(tiny_checkpoint):
    """The blocked causal prefill (prompts past 2 * PREFILL_BLOCK) gives HF's last-position logits
    (float32 parity); greedy tokens alone are too coarse to see a small leak across blocks."""
    path, hf = tiny_checkpoint(sorted(SHAPES)[0])
    ours = load_pretrained(path, dtype="float32")
    batch = _case("long_text_batch", np.random.default_rng(3))
    inputs = ours.prepare(**batch)
    assert inputs.input_ids.shape[1] > 2 * PREFILL_BLOCK

    @jax.jit
    def last_logits(params):
        model = nnx.merge(ours.graphdef, params)
        cache = KVCache.empty(model.config.text, *inputs.input_ids.shape, jnp.float32)
        return model.prefill(inputs.input_ids, inputs.position_ids, inputs.segment_ids, None, None, cache)[0]

    ref = hf_logits(hf, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=inputs.position_ids)[:, -1]
    assert rel_err(last_logits(ours.params), ref) <= 1e-4


def test_stops_per_row_at_eos(tiny_checkpoint):
    path, _ = tiny_checkpoint("untied_w112")
    model = load_pretrained(path, dtype="float32")
    batch = _case("batch_of_three", np.random.default_rng(7))
    inputs = model.prepare(**batch)
    free = generate(model, inputs, max_new_tokens=STEPS, eos_token_ids=[], pad_token_id=0).token_ids
    eos = free[1][3]  # row 1 stops after its 4th token; other rows stop at its first occurrence, if any
    out = generate(model, inputs, max_new_tokens=STEPS, eos_token_ids=[eos], pad_token_id=0).token_ids
    for row_free, row in zip(free, out):
        cut = row_free.index(eos) + 1 if eos in row_free else STEPS
        assert row == row_free[:cut]
    assert out[1] == free[1][:4]


def test_prompt_lengths_share_compiles(tiny_checkpoint):
    path, _ = tiny_checkpoint("tied_w56")
    model = load_pretrained(path, dtype="float32")
    rng = np.random.default_rng(0)
    generate(model, model.prepare(input_ids=rng.integers(0, 400, (1, 41))), max_new_tokens=8,
             eos_token_ids=[], pad_token_id=0)
    before = compile_stats()["compiles"]
    for n in (42, 45, 48):  # all in the 48 bucket
        assert bucket(n) == 48
        generate(model, model.prepare(input_ids=rng.integers(0, 400, (1, n))), max_new_tokens=8,
                 eos_token_ids=[], pad_token_id=0)
    assert compile_stats()["compiles"] == before


def test_bad_requests(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint("tied_w56")[0], dtype="float32")
    inputs = model.prepare(input_ids=np.ones((1, 2000), np.int64))
    with pytest.raises(ContextLengthError, match=r"prompt \(2000 tokens\) \+ max_new_tokens \(100\) exceeds the "
                                                 r"context length \(2048\)"):
        generate(model, inputs, max_new_tokens=100, eos_token_ids=[], pad_token_id=0)
    empty = model.prepare(input_ids=np.ones((1, 3), np.int64), attention_mask=np.zeros((1, 3), np.int64))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, empty, max_new_tokens=4, eos_token_ids=[], pad_token_id=0)


def test_streaming_yields_the_same_tokens(tiny_checkpoint):
    model = load_pretrained(tiny_checkpoint("untied_w112")[0], dtype="float32")
    inputs = model.prepare(**_case("batch_of_three", np.random.default_rng(7)))
    whole = generate(model, inputs, max_new_tokens=6, eos_token_ids=[], pad_token_id=0).token_ids
    streamed = []
    generate(model, inputs, max_new_tokens=6, eos_token_ids=[], pad_token_id=0,
             on_tokens=lambda t: streamed.append(t.tolist()))
    assert np.array(streamed).T.tolist() == whole


def test_video_positions_follow_training_rule(tiny_checkpoint):
    """The positions given to the reference are the training rule's, not transformers 5.x's."""
    batch = _case("video", np.random.default_rng(7))
    pos, _ = get_rope_index(batch["input_ids"], image_token_id=IMG, video_token_id=VID,
                            video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=[1.5])
    text_after = pos[0, 0, -5]
    assert text_after == pos[:, 0, :-5].max() + 1
