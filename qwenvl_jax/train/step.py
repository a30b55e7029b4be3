"""The train step: loss on packed batches, AdamW with warmup + cosine, freezing, accumulation,
clipping, a non-finite guard; jitted with explicit shardings over the model's layout.

State is plain pytrees (nested dicts of arrays): params (f32 master weights by default) and the
optax state, so orbax saves and restores them onto any mesh. The model is merged from the
graphdef inside the step; its compute dtype is set when the graphdef is built.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from qwenvl_jax.data.pipeline import IGNORE, VISION_KEYS
from qwenvl_jax.model.layers import remat_policy
from qwenvl_jax.model.vision_layout import VisionInputs
from qwenvl_jax.sharding import Layout, active
from qwenvl_jax.train.config import OptimSpec

GROUPS = ("vision", "merger", "llm")


def param_group(path: tuple[str, ...]) -> str:
    """vision: ViT blocks + patch embed; merger: the 2x2 merger MLP; llm: decoder + lm_head."""
    if path[0] == "visual":
        return "merger" if path[1] == "merger" else "vision"
    return "llm"


def group_tree(params):
    """A tree like `params` holding each parameter's group name."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_group(tuple(str(getattr(k, "key", k)) for k in path)), params)


def trainable_mask(params, groups: tuple[str, ...]):
    """A tree of bools like `params`: True where the parameter's group trains."""
    return jax.tree.map(lambda g: g in groups, group_tree(params))


def make_optimizer(spec: OptimSpec, steps: int, params, groups: tuple[str, ...]):
    """AdamW (warmup + cosine, decay on matrices only) behind global-norm clipping for the
    trainable groups (the vision group at spec.vision_lr_scale times the rate, its patch embed at a
    further spec.patch_embed_lr_scale, the merger at spec.merger_lr_scale); frozen groups get
    `set_to_zero` and hold no optimizer state.
    Returns (tx, the base schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, max(spec.warmup_steps, 0), max(steps, spec.warmup_steps + 1),
        end_value=spec.learning_rate * spec.min_lr_ratio)
    decay = jax.tree.map(lambda x: x.ndim >= 2, params)

    def adamw(scale: float):
        rate = schedule if scale == 1.0 else (lambda count: scale * schedule(count))
        return optax.adamw(rate, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay, mask=decay)

    def label(path, group):
        if group not in groups:
            return "freeze"
        if group == "vision" and str(getattr(path[1], "key", path[1])) == "patch_embed":
            return "patch_embed"
        return group

    labels = jax.tree_util.tree_map_with_path(label, group_tree(params))
    vision = spec.vision_lr_scale
    # Clipping sees every gradient at once (frozen ones are zeros), so the norm is the global one.
    return optax.chain(optax.clip_by_global_norm(spec.clip_norm), optax.multi_transform(
        {"llm": adamw(1.0), "merger": adamw(spec.merger_lr_scale), "vision": adamw(vision),
         "patch_embed": adamw(vision * spec.patch_embed_lr_scale), "freeze": optax.set_to_zero()}, labels)), schedule


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: object
    bad_steps: jax.Array  # consecutive non-finite steps
    skipped_updates: jax.Array  # all non-finite steps so far


def next_token_loss(logits, labels, segment_ids):
    """(sum of -log p(next token) over trained targets, number of targets). Targets never cross
    samples: position t predicts labels[t+1] only inside the same segment."""
    targets = labels[:, 1:]
    valid = (targets != IGNORE) & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def chunked_next_token_loss(hidden, logits_fn, labels, segment_ids, chunk: int):
    """`next_token_loss` from the final hidden states [B, L, D], `chunk` positions at a time: each
    chunk's f32 logits [B, chunk, V] are made, reduced and dropped (and remade in the backward
    pass), so [B, L, V] never exists. Same targets and sums as the unchunked loss."""
    b, length, d = hidden.shape
    targets = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE, labels.dtype)], axis=1)
    same = jnp.concatenate([(segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0),
                            jnp.zeros((b, 1), bool)], axis=1)
    valid = (targets != IGNORE) & same  # position t predicts labels[t + 1] in its own segment
    n = -(-length // chunk)
    pad = n * chunk - length

    def split(x):  # [B, L, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(h, t, ok):
        logp = jax.nn.log_softmax(logits_fn(h).astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(ok, t, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(ok, nll, 0.0))

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (split(hidden), split(targets), split(valid)))
    return total, jnp.sum(valid)


def batch_inputs(batch: dict, window_len: int, max_full_len: int):
    """A pipeline batch (arrays) -> model call arguments."""
    vision = VisionInputs(**{k: batch[k] for k in VISION_KEYS}, window_len=window_len, max_full_len=max_full_len)
    return batch["input_ids"], jnp.moveaxis(batch["position_ids"], 1, 0), batch["segment_ids"], vision, \
        batch["vision_token_index"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step (hashable)."""
    groups: tuple[str, ...]
    remat: str
    window_len: int
    max_full_len: int
    max_bad_steps: int
    loss_chunk: int = 0  # positions per logits chunk in the loss; 0: all at once


def _is_none(x):
    return x is None


def split_trainable(params, mask):
    """(trainable, frozen) trees with None in the other's places: gradients (and their
    accumulation buffers) exist only for trainable parameters."""
    return (jax.tree.map(lambda p, t: p if t else None, params, mask),
            jax.tree.map(lambda p, t: None if t else p, params, mask))


def join(trainable, frozen):
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen, is_leaf=_is_none)


def loss_sum(trainable, frozen, graphdef, batch, cfg: StepConfig):
    model = nnx.merge(graphdef, join(trainable, frozen))
    inputs = batch_inputs(batch, cfg.window_len, cfg.max_full_len)
    length = batch["input_ids"].shape[-1]
    with remat_policy(cfg.remat):
        if 0 < cfg.loss_chunk < length:
            return chunked_next_token_loss(model.hidden(*inputs), model.logits, batch["labels"],
                                           batch["segment_ids"], cfg.loss_chunk)
        logits = model(*inputs)
    return next_token_loss(logits, batch["labels"], batch["segment_ids"])


def train_step(state: TrainState, batch: dict, *, graphdef, tx, layout: Layout, cfg: StepConfig):
    """One optimizer step over batch arrays shaped [accum, rows, ...] (token-mean loss over all
    microbatches). Returns (state, metrics)."""
    mask = trainable_mask(state.params, cfg.groups)
    trainable, frozen = split_trainable(state.params, mask)

    def micro(carry, mb):
        grads, total, count = carry
        (value, n), g = jax.value_and_grad(loss_sum, has_aux=True)(trainable, frozen, graphdef, mb, cfg)
        return (jax.tree.map(jnp.add, grads, g), total + value, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    with active(layout):
        (grads, total, count), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.int32(0)), batch)
    scale = 1.0 / jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g * scale, grads)
    new_state, metrics = apply_gradients(state, grads, total * scale, tx)
    return new_state, {**metrics, "tokens": count}


def apply_gradients(state: TrainState, grads, loss, tx):
    """Optimizer update from trainable-only grads (None elsewhere); a non-finite loss or
    gradient keeps the old params and optimizer state and is counted."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Frozen groups: zero gradients for optax's set_to_zero branch (folded away by XLA).
    grads = jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g, grads, state.params, is_leaf=_is_none)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    bad = jnp.where(finite, 0, state.bad_steps + 1)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state), bad_steps=bad,
                           skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def dpo_loss_fn(trainable, frozen, ref_params, graphdef, batch, cfg: StepConfig, beta: float):
    """Sigmoid DPO on a pair batch (rows 0..B-1 chosen, B..2B-1 rejected) against the frozen
    reference model's sequence log-probs."""
    from qwenvl_jax.train.dpo import dpo_loss, sequence_logps

    inputs = batch_inputs(batch, cfg.window_len, cfg.max_full_len)
    with remat_policy(cfg.remat):
        logits = nnx.merge(graphdef, join(trainable, frozen))(*inputs)
    ref_logits = jax.lax.stop_gradient(nnx.merge(graphdef, ref_params)(*inputs))
    logps, _ = sequence_logps(logits, batch["labels"], batch["segment_ids"])
    ref, _ = sequence_logps(ref_logits, batch["labels"], batch["segment_ids"])
    b = logps.shape[0] // 2
    return dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta)


def dpo_train_step(state: TrainState, batch: dict, ref_params, *, graphdef, tx, layout: Layout,
                   cfg: StepConfig, beta: float):
    """One DPO optimizer step over [accum, 2B, ...] pair batches (mean over microbatches)."""
    mask = trainable_mask(state.params, cfg.groups)
    trainable, frozen = split_trainable(state.params, mask)

    def micro(carry, mb):
        grads, total, stats = carry
        (value, m), g = jax.value_and_grad(dpo_loss_fn, has_aux=True)(trainable, frozen, ref_params, graphdef,
                                                                       mb, cfg, beta)
        return (jax.tree.map(jnp.add, grads, g), total + value, jax.tree.map(jnp.add, stats, m)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    stats0 = {k: jnp.float32(0) for k in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")}
    with active(layout):
        (grads, total, stats), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), stats0), batch)
    n = batch["input_ids"].shape[0]
    grads = jax.tree.map(lambda g: g / n, grads)
    new_state, metrics = apply_gradients(state, grads, total / n, tx)
    tokens = jnp.sum(batch["segment_ids"] > 0)
    return new_state, {**metrics, **{k: v / n for k, v in stats.items()}, "tokens": tokens}


def _keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(state_abstract: TrainState, param_shardings: dict, tx, layout: Layout) -> TrainState:
    """Optimizer moments are sharded like their params (matched by the param path their state
    path ends with); counters and anything else replicated."""
    by_path = {_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def place(path, leaf):
        keys = _keys(path)
        for i in range(len(keys)):
            s = by_path.get(keys[i:])
            if s is not None and len(s.spec) <= len(leaf.shape):
                return s
        return layout.replicated

    opt = jax.tree_util.tree_map_with_path(place, state_abstract.opt_state)
    rep = layout.replicated
    return TrainState(step=rep, params=param_shardings, opt_state=opt, bad_steps=rep, skipped_updates=rep)


def batch_shardings(batch: dict, layout: Layout) -> dict:
    """[accum, rows, ...] arrays: rows over the batch axes."""
    return {k: layout.sharding((None, "batch") + (None,) * (np.ndim(v) - 2), np.shape(v)) for k, v in batch.items()}


def compile_step(state_abstract, batch_abstract, *, graphdef, tx, layout, cfg: StepConfig,
                 state_sharding: TrainState, dpo_beta: float | None = None):
    """jit(train step) with explicit in/out shardings, state donated, compiled ahead of time.
    With dpo_beta the step is DPO's and takes the reference params (sharded like the params)."""
    in_batch = batch_shardings(batch_abstract, layout)
    if dpo_beta is None:
        fn = functools.partial(train_step, graphdef=graphdef, tx=tx, layout=layout, cfg=cfg)
        shardings, args = (state_sharding, in_batch), (state_abstract, batch_abstract)
    else:
        fn = functools.partial(dpo_train_step, graphdef=graphdef, tx=tx, layout=layout, cfg=cfg, beta=dpo_beta)
        shardings = (state_sharding, in_batch, state_sharding.params)
        args = (state_abstract, batch_abstract, state_abstract.params)
    jitted = jax.jit(fn, in_shardings=shardings, out_shardings=(state_sharding, layout.replicated), donate_argnums=0)
    return jitted.lower(*args).compile(), in_batch


def init_state(params: dict, tx) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), bad_steps=zero, skipped_updates=zero)
