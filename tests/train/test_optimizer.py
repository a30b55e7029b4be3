"""make_optimizer against a numpy AdamW written from the paper's update rule (Loshchilov & Hutter):
clipping by global norm, bias-corrected moments, decoupled weight decay on matrices only,
warmup + cosine schedule, frozen groups untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenvl_jax.train import step as steplib
from qwenvl_jax.train.config import OptimSpec


def _lr(spec: OptimSpec, steps: int, t: int) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine to learning_rate * min_lr_ratio at `steps`."""
    if t < spec.warmup_steps:
        return spec.learning_rate * t / spec.warmup_steps
    frac = (t - spec.warmup_steps) / (steps - spec.warmup_steps)
    end = spec.learning_rate * spec.min_lr_ratio
    return end + (spec.learning_rate - end) * 0.5 * (1 + np.cos(np.pi * frac))


def _numpy_adamw(spec: OptimSpec, steps: int, params: dict, grads_per_step: list[dict], trainable: set[str],
                 lr_scale: dict[str, float]):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_per_step):
        g = {k: np.asarray(grads[k], np.float64) for k in trainable}
        norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
        g = {k: x * min(1.0, spec.clip_norm / norm) for k, x in g.items()}
        for k, x in g.items():
            lr = _lr(spec, steps, t) * lr_scale.get(k, 1.0)
            m[k] = spec.b1 * m[k] + (1 - spec.b1) * x
            v2[k] = spec.b2 * v2[k] + (1 - spec.b2) * x * x
            mhat, vhat = m[k] / (1 - spec.b1 ** (t + 1)), v2[k] / (1 - spec.b2 ** (t + 1))
            update = mhat / (np.sqrt(vhat) + spec.eps)
            if p[k].ndim >= 2:
                update = update + spec.weight_decay * p[k]
            p[k] = p[k] - lr * update
    return p


@pytest.mark.parametrize("groups,vision_lr_scale,patch_embed_lr_scale,merger_lr_scale",
                         [(("llm",), 1.0, 1.0, 1.0), (("vision", "merger", "llm"), 0.25, 1.0, 1.0),
                          (("vision", "merger", "llm"), 1.0, 0.1, 0.5)])
def test_adamw_matches_the_update_rule(groups, vision_lr_scale, patch_embed_lr_scale, merger_lr_scale):
    rng = np.random.default_rng(0)
    # Small gradients (1e-3) make a misplaced epsilon visible: Adam's step must not depend on their scale.
    params = {"visual": {"blocks": {"w": rng.standard_normal((4, 3)).astype(np.float32)},
                         "patch_embed": {"w": rng.standard_normal((6, 4)).astype(np.float32)},
                         "merger": {"w": rng.standard_normal((4, 2)).astype(np.float32)}},
              "language_model": {"w": rng.standard_normal((3, 5)).astype(np.float32),
                                 "b": rng.standard_normal((5,)).astype(np.float32)}}
    paths = {"v": ("visual", "blocks", "w"), "pe": ("visual", "patch_embed", "w"), "mg": ("visual", "merger", "w"),
             "w": ("language_model", "w"), "b": ("language_model", "b")}
    spec = OptimSpec(learning_rate=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                     eps=1e-8, clip_norm=1e-2, vision_lr_scale=vision_lr_scale,
                     patch_embed_lr_scale=patch_embed_lr_scale, merger_lr_scale=merger_lr_scale)
    steps = 6
    tx, _ = steplib.make_optimizer(spec, steps, params, groups=groups)
    state = tx.init(params)
    grads_per_step = []
    p = params
    for _ in range(steps):
        g = {k: (1e-3 * rng.standard_normal(np.shape(_get(params, path)))).astype(np.float32)
             for k, path in paths.items()}
        grads_per_step.append(g)
        tree = {"visual": {"blocks": {"w": jnp.asarray(g["v"])}, "patch_embed": {"w": jnp.asarray(g["pe"])},
                           "merger": {"w": jnp.asarray(g["mg"])}},
                "language_model": {"w": jnp.asarray(g["w"]), "b": jnp.asarray(g["b"])}}
        updates, state = tx.update(tree, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    trainable = {"w", "b"} | ({"v", "pe"} if "vision" in groups else set()) | ({"mg"} if "merger" in groups else set())
    want = _numpy_adamw(spec, steps, {k: _get(params, path) for k, path in paths.items()}, grads_per_step,
                        trainable, lr_scale={"v": vision_lr_scale, "pe": vision_lr_scale * patch_embed_lr_scale,
                                             "mg": merger_lr_scale})
    for k, path in paths.items():
        if k in trainable:
            np.testing.assert_allclose(_get(p, path), want[k], rtol=1e-5, atol=1e-6)
        else:  # a frozen group never moves
            np.testing.assert_array_equal(_get(p, path), _get(params, path))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)
