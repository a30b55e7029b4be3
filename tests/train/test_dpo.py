"""DPO: sequence log-probs and the loss (values and gradients) against torch; pair encoding and batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwenvl_jax.batch import ModelInputs
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.formats import DataError
from qwenvl_jax.data.pipeline import IGNORE, DataConfig, batch_vision
from qwenvl_jax.model.vision_layout import stack_rows, vision_inputs
from qwenvl_jax.train.dpo import PairEncoder, dpo_loss, pair_batch, sequence_logps


def _torch_logps(logits, labels, segment_ids=None):
    """Reference: log_softmax + gather, the next-token rule spelled out position by position."""
    logp = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64) if not torch.is_tensor(logits)
                             else logits, -1)
    out, counts = [], []
    for b in range(labels.shape[0]):
        total, n = logp.new_zeros(()), 0
        for t in range(labels.shape[1] - 1):
            same = segment_ids is None or segment_ids[b, t + 1] == segment_ids[b, t] > 0
            if labels[b, t + 1] != IGNORE and same:
                total, n = total + logp[b, t, labels[b, t + 1]], n + 1
        out.append(total)
        counts.append(n)
    return torch.stack(out), np.array(counts)


def _torch_dpo(pc, pr, rc, rr, beta, ls):
    z = beta * ((pc - rc) - (pr - rr))
    return (-(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)).mean()


def _random_case(seed, b=4, length=9, vocab=13):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (b, length, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, (b, length)).astype(np.int32)
    labels[rng.random((b, length)) < 0.3] = IGNORE
    labels[2] = IGNORE  # a row with nothing to score
    segment_ids = np.array([[1] * 9, [1, 1, 1, 2, 2, 2, 2, 0, 0], [1] * 6 + [0] * 3, [1, 1, 2, 2, 2, 3, 3, 3, 3]],
                           np.int32)[:b]
    return logits, labels, segment_ids


@pytest.mark.parametrize("with_segments", [False, True])
def test_sequence_logps_matches_torch(with_segments):
    logits, labels, seg = _random_case(0)
    seg = seg if with_segments else None
    logps, counts = sequence_logps(jnp.asarray(logits), jnp.asarray(labels), None if seg is None else jnp.asarray(seg))
    ref, ref_counts = _torch_logps(logits, labels, seg)
    np.testing.assert_allclose(np.asarray(logps), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)
    assert logps.dtype == jnp.float32 and counts[2] == 0 and logps[2] == 0
    if with_segments:  # the boundaries really removed terms
        assert (ref_counts < _torch_logps(logits, labels)[1]).any()
    # bf16 logits: the normalizer is still computed in f32
    low, _ = sequence_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    exact, _ = _torch_logps(torch.tensor(logits).bfloat16().double(), labels)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), exact.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_loss_values_metrics_and_gradients_match_torch(ls):
    beta = 0.3
    rng = np.random.default_rng(1)
    args = [rng.normal(-40, 5, 6).astype(np.float32) for _ in range(4)]
    loss, metrics = dpo_loss(*args, beta=beta, label_smoothing=ls)
    grads = jax.grad(lambda *a: dpo_loss(*a, beta=beta, label_smoothing=ls)[0], argnums=(0, 1, 2, 3))(*args)
    t = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in args]
    ref = _torch_dpo(*t, beta, ls)
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    for g, tt in zip(grads, t):
        np.testing.assert_allclose(np.asarray(g), tt.grad.numpy(), rtol=1e-5, atol=1e-7)
    pc, pr, rc, rr = (a.astype(np.float64) for a in args)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    assert 0 < (chosen > rejected).mean() < 1  # the accuracy check is not vacuous
    expect = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
              "reward_margin": (chosen - rejected).mean(), "reward_accuracy": (chosen > rejected).mean()}
    assert set(metrics) == set(expect)
    for k, v in expect.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    # Sanity: equal policy and reference give log 2 whatever the smoothing.
    np.testing.assert_allclose(float(dpo_loss(args[0], args[1], args[0], args[1], beta, ls)[0]), np.log(2), rtol=1e-6)


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_dpo_gradient_through_sequence_logps_matches_torch(ls):
    """End to end: d loss / d logits, chosen rows first then rejected, as pair_batch lays them out."""
    beta, pairs = 0.5, 2
    logits, labels, seg = _random_case(2)
    ref_logps = np.random.default_rng(3).normal(-20, 2, 2 * pairs).astype(np.float32)

    def loss_fn(x):
        lp, _ = sequence_logps(x, jnp.asarray(labels), jnp.asarray(seg))
        return dpo_loss(lp[:pairs], lp[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta, ls)[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logits))
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    lp, _ = _torch_logps(x, labels, seg)
    r = torch.tensor(ref_logps, dtype=torch.float64)
    ref = _torch_dpo(lp[:pairs], lp[pairs:], r[:pairs], r[pairs:], beta, ls)
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert np.abs(x.grad.numpy()).max() > 1e-3


# ------------------------------------------------------------------------------------------- pair data

SEQ_LEN = 112


@pytest.fixture(scope="module")
def setup(chat_checkpoint, tmp_path_factory):
    from qwenvl_jax.pretrained import load_pretrained
    from qwenvl_jax.processing.processor import Processor

    path = chat_checkpoint[0]
    root = tmp_path_factory.mktemp("dpo_data")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(root / "a.png")
    processor, config = Processor.from_pretrained(path), Qwen25VLConfig.from_hf_file(path)
    return processor, config, PairEncoder(processor, config, SEQ_LEN, data_root=root), \
        load_pretrained(path, dtype="float32")


RECORDS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "What is the weather today?"}],
     "chosen": "The weather today is sunny and warm.",
     "rejected": {"role": "assistant", "content": [{"type": "text", "text": "The light is off."}]}},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is in the picture?"}]}],
     "chosen": "A small brown dog.", "rejected": [{"role": "assistant", "content": "A red car."}]},
]


def test_pair_encoding_shares_the_prompt_and_labels_only_the_answer(setup):
    processor, config, encoder, _ = setup
    im_end = processor.tokenizer.token_to_id("<|im_end|>")
    for record in RECORDS:
        chosen, rejected = encoder(record)
        start = chosen["answer_start"]
        assert start == rejected["answer_start"] > 0
        np.testing.assert_array_equal(chosen["input_ids"][:start], rejected["input_ids"][:start])
        np.testing.assert_array_equal(chosen["positions"][:start], rejected["positions"][:start])
        np.testing.assert_array_equal(chosen["patches"], rejected["patches"])
        for sample, key in ((chosen, "chosen"), (rejected, "rejected")):
            answer = record[key]
            answer = answer if isinstance(answer, str) else (answer[0] if isinstance(answer, list) else answer)
            text = answer if isinstance(answer, str) else answer["content"]
            text = text if isinstance(text, str) else text[0]["text"]
            where = np.flatnonzero(sample["labels"] != IGNORE)
            assert where[0] > start and np.all(np.diff(where) == 1)  # one span, inside the final turn
            ids = sample["input_ids"][where]
            assert ids[-1] == im_end and processor.decode(ids[:-1].tolist()) == text
            np.testing.assert_array_equal(sample["labels"][where], ids)
    assert len(encoder(RECORDS[1])[0]["grids"]) == 1


def test_pair_batch_gives_each_answer_the_logp_it_has_alone(setup):
    _, config, encoder, model = setup
    pairs = [encoder(r) for r in RECORDS]
    batch = pair_batch(pairs, config, SEQ_LEN)
    data = DataConfig(seq_len=SEQ_LEN)
    patches, slots = data.budgets(config.vision.window_patches)
    b = len(pairs)
    assert batch["input_ids"].shape == (2 * b, SEQ_LEN) and batch["position_ids"].shape == (2 * b, 3, SEQ_LEN)
    assert batch["pixel_values"].shape == (2 * b, patches, config.vision.patch_dim)
    assert batch["window_segment_ids"].shape == (2 * b, slots)
    for r, s in enumerate([c for c, _ in pairs] + [x for _, x in pairs]):
        n = len(s["input_ids"])
        np.testing.assert_array_equal(batch["segment_ids"][r], (np.arange(SEQ_LEN) < n).astype(np.int32))
        np.testing.assert_array_equal(batch["input_ids"][r, :n], s["input_ids"])
        np.testing.assert_array_equal(batch["labels"][r, :n], s["labels"])
        assert (batch["labels"][r, n:] == IGNORE).all()

    inputs = ModelInputs(input_ids=batch["input_ids"], position_ids=batch["position_ids"].transpose(1, 0, 2),
                         segment_ids=batch["segment_ids"], rope_deltas=np.zeros(2 * b, np.int32),
                         vision=batch_vision(batch, config, data), vision_token_index=batch["vision_token_index"])
    logps, counts = sequence_logps(model.forward(inputs), batch["labels"], batch["segment_ids"])
    assert (np.asarray(counts) > 0).all()
    for r, (s, _) in enumerate(pairs):  # chosen rows (each alone-shape is one more compile, so not all)
        vision = index = None
        if len(s["grids"]):
            vision = stack_rows([vision_inputs(s["patches"], s["grids"], config.vision)])
            index = s["vision_token_index"][None]
        ids = s["input_ids"][None]
        alone = model.forward(ModelInputs(input_ids=ids, position_ids=s["positions"].T[:, None],
                                          segment_ids=np.ones_like(ids), rope_deltas=np.zeros(1, np.int32),
                                          vision=vision, vision_token_index=index))
        ref, ref_count = sequence_logps(alone, s["labels"][None])
        assert int(counts[r]) == int(ref_count[0]) == (s["labels"] != IGNORE).sum()
        assert abs(float(logps[r]) - float(ref[0])) <= 1e-5 * abs(float(ref[0])), r


def test_bad_pairs_raise(setup):
    processor, config, encoder, _ = setup
    good = RECORDS[0]
    bad = [({k: v for k, v in good.items() if k != "rejected"}, "bad_format"),
           ({**good, "chosen": 3}, "bad_format"),
           ({**good, "chosen": {"role": "user", "content": "x"}}, "bad_format"),
           ({**good, "chosen": "  "}, "bad_format"),
           ({**good, "messages": good["messages"][:2]}, "bad_format"),  # prompt ends with an answer
           ({**good, "messages": []}, "bad_format"),
           ({**good, "chosen": "<|im_end|> sneaky"}, "bad_format"),
           ({**RECORDS[1], "messages": [{"role": "user", "content": [{"type": "image", "image": "no.png"}]}]},
            "missing_image")]
    for record, reason in bad:
        with pytest.raises(DataError) as e:
            encoder(record)
        assert e.value.reason == reason, record
    short = PairEncoder(processor, config, 24)
    with pytest.raises(DataError) as e:
        short(good)
    assert e.value.reason == "too_long"
    with pytest.raises(DataError) as e:  # a budget smaller than the encoder's
        pair_batch([encoder(good)], config, 24)
    assert e.value.reason == "too_long"
