"""Direct Preference Optimization (Rafailov et al. 2023): sequence log-probs, the loss, and pair data.

A DPO record is a prompt and two answers, one preferred:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                               {"type": "text", "text": "What is it?"}]}],
     "chosen": "A dog.", "rejected": {"role": "assistant", "content": "A cat."}}

`PairEncoder` encodes each answer as the final assistant turn of the prompt with the SFT encoder,
so both halves of a pair see exactly the tokens, images and MRoPE positions an SFT sample would,
and only the final answer (+ <|im_end|>) is labeled. `pair_batch` puts each sample alone in its
own row (chosen rows first, then rejected), in the SFT row layout, so the train step runs the
model on it as on an SFT batch and gets per-answer log-probs from `sequence_logps`:

    batch = pair_batch(pairs, config, seq_len, patch_budget, slot_budget)
    logits = model(..., vision=batch_vision(batch, config, DataConfig(seq_len, patch_budget, slot_budget)))
    logps, _ = sequence_logps(logits, batch["labels"], batch["segment_ids"])
    loss, metrics = dpo_loss(logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], beta)
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.formats import BAD_FORMAT, ROLES, TOO_LONG, DataError
from qwenvl_jax.data.pipeline import IGNORE, DataConfig, RowLayout, SampleEncoder, record_order


def sequence_logps(logits, labels, segment_ids=None, ignore_index: int = IGNORE):
    """Sum over each row of log p(labels[t+1] | tokens <= t), and the number of terms -> ([B], [B]).

    labels are aligned with the input ids (unshifted, as the data pipeline writes them), so the
    prediction at t is scored against labels[t+1]. With segment_ids, a target must sit in the same
    real segment as its prediction, so a packed row never scores one sample from another's context.
    The normalizer is a f32 logsumexp over the vocabulary: bf16 logits would lose the small
    log-prob differences DPO trains on, and no [B, L, V] log-softmax is materialized.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != ignore_index
    if segment_ids is not None:
        valid &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    token_logps = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(valid, token_logps, 0.0).sum(-1), valid.sum(-1).astype(jnp.int32)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """Sigmoid DPO loss over pairs [B] of sequence log-probs -> (mean loss, metrics).

    loss = -(1 - ls) log sigmoid(z) - ls log sigmoid(-z), z = beta ((pc - rc) - (pr - rr)).
    label_smoothing > 0 is the conservative DPO variant: it treats each preference label as
    flipped with probability ls, so noisy labels cannot drive z to infinity. The function is the
    plain objective of all four inputs; the reference log-probs come from a frozen model, so the
    train step simply does not differentiate them. Metrics are means over pairs of the implicit
    rewards beta (policy - reference), their margin, and how often chosen beats rejected.
    """
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    z = chosen - rejected
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    metrics = {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
               "reward_margin": (chosen - rejected).mean(),
               "reward_accuracy": (chosen > rejected).astype(jnp.float32).mean()}
    return losses.mean(), metrics


def _answer(record: dict, key: str) -> dict:
    """record[key] -> the final assistant message: text, a message, or a one-message list (TRL's form)."""
    if key not in record:
        raise DataError(BAD_FORMAT, f"a DPO record needs {key!r}; found keys {sorted(record)[:10]}")
    value = record[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and "content" in value and ROLES.get(value.get("role", "assistant")) == "assistant":
        return {"role": "assistant", "content": value["content"]}
    raise DataError(BAD_FORMAT, f"{key!r} must be answer text or one assistant message, got {str(value)[:80]!r}")


class PairEncoder:
    """DPO record (dict) -> (chosen sample, rejected sample), each as SampleEncoder.encode returns it
    (labels on the final answer only) plus answer_start, the index of the answer turn's <|im_start|>.

    Reusing the SFT encoder (rather than encoding the prompt once and appending answers) keeps the
    prompt tokenization, vision features and positions exactly those of SFT, and lets the same
    checks (media, control tokens, budgets) reject bad records. data_options go to DataConfig
    (patch_budget, slot_budget, max_items, min_pixels, max_pixels, video_fps). Raises DataError.
    """

    def __init__(self, processor, config: Qwen25VLConfig, seq_len: int, data_root=None, **data_options):
        self.data = DataConfig(seq_len=seq_len, shuffle=False, on_bad_sample="raise", **data_options)
        self.encoder = SampleEncoder(processor, config, self.data, data_root=data_root)

    def for_source(self, source) -> PairEncoder:
        """As SampleEncoder.for_source: media resolve against the JSONL's directory unless data_root was given."""
        encoder = self.encoder.for_source(source)
        if encoder is self.encoder:
            return self
        pairs = copy.copy(self)
        pairs.encoder = encoder
        return pairs

    def __call__(self, record: dict) -> tuple[dict, dict]:
        if not isinstance(record, dict):
            raise DataError(BAD_FORMAT, f"a DPO record must be a JSON object, got {type(record).__name__}")
        prompt = record.get("messages")
        if not isinstance(prompt, list) or not prompt:
            raise DataError(BAD_FORMAT, "a DPO record needs 'messages': a non-empty list of prompt turns")
        if isinstance(prompt[-1], dict) and ROLES.get(prompt[-1].get("role")) == "assistant":
            raise DataError(BAD_FORMAT, "the prompt must not end with an assistant turn; the answers are "
                                        "'chosen' and 'rejected'")
        chosen, rejected = (self._encode(prompt, _answer(record, key)) for key in ("chosen", "rejected"))
        start = chosen["answer_start"]
        if start != rejected["answer_start"] or not np.array_equal(chosen["input_ids"][:start],
                                                                   rejected["input_ids"][:start]):
            raise DataError(BAD_FORMAT, "chosen and rejected encode to different prompts")
        return chosen, rejected

    def _encode(self, prompt: list, answer: dict) -> dict:
        try:
            sample = self.encoder.encode(json.dumps({"messages": [*prompt, answer]}))
        except (ValueError, OSError) as e:  # as SampleEncoder.__call__: a record the processor rejects
            if isinstance(e, DataError):
                raise
            raise DataError(BAD_FORMAT, f"cannot encode record: {e}") from e
        # Earlier assistant turns of a multi-turn prompt are context, not what is being compared.
        start = int(np.flatnonzero(sample["input_ids"] == self.encoder.im_start)[-1])
        labels = sample["labels"].copy()
        labels[:start] = IGNORE
        if not self.encoder.processor.decode(sample["input_ids"][labels != IGNORE].tolist()).strip():
            raise DataError(BAD_FORMAT, "an answer has no text")  # nothing to prefer
        return {**sample, "labels": labels, "answer_start": start}


def pair_batch(pairs, config: Qwen25VLConfig, seq_len: int, patch_budget: int | None = None,
               slot_budget: int | None = None) -> dict:
    """[(chosen, rejected)] * B -> one batch of 2B rows: chosen in rows 0..B-1, rejected in B..2B-1.

    One sample per row, right-padded to seq_len (segment id 1, padding 0), laid out by the SFT
    pipeline's RowLayout, so the keys, shapes and vision layout are those of an SFT batch with
    the same budgets (normalized as DataConfig.budgets does; batch_vision with a DataConfig of the
    same seq_len/patch_budget/slot_budget gives the model's VisionInputs). Unpacked rows keep the
    chosen/rejected pairing positional. Raises DataError(too_long) for a sample over a budget.
    """
    data = DataConfig(seq_len=seq_len, patch_budget=patch_budget, slot_budget=slot_budget)
    patches, slots = data.budgets(config.vision.window_patches)
    layout = RowLayout(config, data)
    rows = [layout(_packed_row(s, seq_len, patches, slots)) for s in
            [c for c, _ in pairs] + [r for _, r in pairs]]
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def _packed_row(sample: dict, seq_len: int, patches: int, slots: int) -> dict:
    """A lone sample in the form grain's packer gives RowLayout: text features padded to seq_len,
    each feature with its segment ids (1 = this sample, 0 = padding)."""
    n = len(sample["input_ids"])
    if n > seq_len or len(sample["patches"]) > patches or len(sample["slots"]) > slots:
        raise DataError(TOO_LONG, f"sample needs {n} tokens, {len(sample['patches'])} patches, "
                                  f"{len(sample['slots'])} ViT slots; budgets {seq_len}, {patches}, {slots}")

    def pad(x):
        return np.concatenate([x, np.zeros((seq_len - n, *x.shape[1:]), x.dtype)])

    row = {k: pad(sample[k]) for k in ("input_ids", "labels", "positions", "vision_token_index")}
    row["input_ids_segment_ids"] = pad(np.ones(n, np.int32))
    for k in ("patches", "grids", "skips"):
        row[k], row[f"{k}_segment_ids"] = sample[k], np.ones(len(sample[k]), np.int32)
    return row


class _EncodeOrSkip:
    """raw JSONL line -> (chosen, rejected), or None for a bad record (dropped by the filter)."""

    def __init__(self, encoder: PairEncoder):
        self.encoder = encoder

    def __call__(self, raw):
        from qwenvl_jax.data.sources import parse_line

        try:
            return self.encoder(parse_line(raw))
        except DataError:
            return None


def make_pair_dataset(source, encoder: PairEncoder, config: Qwen25VLConfig, data: DataConfig, *,
                      process_index: int = 0, process_count: int = 1):
    """DPO pairs as a grain IterDataset of pair batches (2 x data.batch_size rows), shuffled and
    sharded like the SFT pipeline; checkpointable the same way. Bad records are dropped. Relative
    media paths resolve as in make_dataset (encoder's data_root, else the JSONL file's directory)."""
    patches, slots = data.budgets(config.vision.window_patches)
    encoder = encoder.for_source(source)
    ds = record_order(source, data, process_index, process_count).map(_EncodeOrSkip(encoder))
    ds = ds.to_iter_dataset().filter(lambda x: x is not None)
    return ds.batch(data.batch_size, drop_remainder=True,
                    batch_fn=lambda pairs: pair_batch(pairs, config, data.seq_len, patches, slots))
