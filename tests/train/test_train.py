"""The train step: gradients equal transformers' on the same batch and loss; freezing; a sharded
step equals the single-device step; a tiny model overfits a small packed dataset."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import TOKENS

from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder, make_dataset, open_source
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.sharding import Layout, param_shardings
from qwenvl_jax.train import step as steplib
from qwenvl_jax.train.config import OptimSpec
from qwenvl_jax.train.synthetic import write_synthetic_dataset
from qwenvl_jax.weights import hf_keys
from qwenvl_jax.weights.load import abstract_model

IMG, VS, VE = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]


def _hf_batch(rng):
    grid = (1, 8, 12)
    ids = np.array([list(rng.integers(0, 400, 5)) + [VS] + [IMG] * 24 + [VE] + list(rng.integers(0, 400, 12))])
    labels = np.full_like(ids, -100)
    labels[0, -10:] = ids[0, -10:]
    pixels = rng.standard_normal((96, 1176)).astype(np.float32)
    return ids, labels, pixels, np.array([grid])


@pytest.mark.parametrize("loss_chunk", [0, 7])
def test_gradients_match_transformers(tiny_checkpoint, loss_chunk):
    """Same batch (text + image), same loss (mean next-token CE over labelled targets): every
    parameter's gradient within 1e-4 (max |diff| / max |ref|) of PyTorch's; also with the loss's
    logits made 7 positions at a time (43 positions: 7 chunks, the last one padded)."""
    path, hf = tiny_checkpoint("untied_w112")
    rng = np.random.default_rng(0)
    ids, labels, pixels, grids = _hf_batch(rng)
    hf.zero_grad()
    out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
             labels=torch.tensor(labels), mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    out.loss.backward()
    ref = {hf_keys.canonical_name(n): p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    model = load_pretrained(path, dtype="float32")
    inputs = model.prepare(input_ids=ids, pixel_values=pixels, image_grid_thw=grids)
    batch = {"input_ids": inputs.input_ids, "position_ids": inputs.position_ids.transpose(1, 0, 2),
             "segment_ids": inputs.segment_ids, "labels": labels.astype(np.int32),
             "vision_token_index": inputs.vision_token_index,
             **{k: getattr(inputs.vision, k) for k in steplib.VISION_KEYS}}
    cfg = steplib.StepConfig(groups=steplib.GROUPS, remat="full", window_len=inputs.vision.window_len,
                             max_full_len=inputs.vision.max_full_len, max_bad_steps=1, loss_chunk=loss_chunk)
    params = nnx.to_pure_dict(model.params)
    _, nothing_frozen = steplib.split_trainable(params, steplib.trainable_mask(params, steplib.GROUPS))

    def loss(p):
        total, count = steplib.loss_sum(p, nothing_frozen, model.graphdef, batch, cfg)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(value) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    checked = 0
    for path_, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        template, kind = hf_keys.hf_name(hf_keys.path_names(path_))
        layers = [(template.format(i=i), np.asarray(g)[i]) for i in range(g.shape[0])] \
            if hf_keys.is_stacked(template) else [(template, np.asarray(g))]
        for name, x in layers:
            want = ref[name]
            got = hf_keys.to_hf(x, kind, want.shape)
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
            assert err <= 1e-4, (name, err)
            checked += 1
    assert checked == len(ref)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), samples=16, seed=0)


DATA = DataConfig(seq_len=128, patch_budget=256, max_items=8, batch_size=2, packing_bins=4, epochs=None)


def _setup(synthetic, mesh=None, groups=steplib.GROUPS, lr=3e-3, steps=100, eps=1e-8):
    from qwenvl_jax.train.loop import preset_config  # the config path of the CLI

    processor = Processor.from_pretrained(synthetic)
    config = preset_config("tiny", processor)
    layout = Layout.create(mesh).for_model(config)
    graphdef, abstract = abstract_model(config, jnp.float32)
    shardings = nnx.to_pure_dict(param_shardings(abstract, layout))
    from qwenvl_jax.model.qwen25vl import Qwen25VL

    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Qwen25VL(config, rngs=nnx.Rngs(0)))),
                     out_shardings=shardings)()
    tx, _ = steplib.make_optimizer(OptimSpec(learning_rate=lr, warmup_steps=2, eps=eps), steps, params, groups)
    abstract_state = jax.eval_shape(lambda p: steplib.init_state(p, tx), params)
    state_sharding = steplib.state_shardings(abstract_state, shardings, tx, layout)
    state = jax.jit(lambda p: steplib.init_state(p, tx), out_shardings=state_sharding)(params)
    ds = make_dataset(open_source(synthetic / "train.jsonl"),
                      SampleEncoder(processor, config, DATA, data_root=synthetic), config, DATA)
    _, slots = DATA.budgets(config.vision.window_patches)
    cfg = steplib.StepConfig(groups=groups, remat="full", window_len=config.vision.window_patches,
                             max_full_len=slots, max_bad_steps=3)
    return dict(state=state, abstract=abstract_state, sharding=state_sharding, graphdef=graphdef, tx=tx,
                layout=layout, cfg=cfg, ds=ds)


def _stack(batches):
    return {k: np.stack([b[k] for b in batches]) for k in batches[0] if k not in ("num_samples", "skip_counts")}


def _compiled(env, batch):
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    fn, sharding = steplib.compile_step(env["abstract"], abstract, graphdef=env["graphdef"], tx=env["tx"],
                                        layout=env["layout"], cfg=env["cfg"], state_sharding=env["sharding"])
    return fn, sharding


def _run(env, batch, fn, sharding):
    arrays = {k: jax.make_array_from_process_local_data(sharding[k], v) for k, v in batch.items()}
    return fn(env["state"], arrays)


def test_tiny_model_overfits_packed_data(synthetic):
    env = _setup(synthetic, steps=80)
    it = iter(env["ds"])
    batches = [_stack([next(it)]) for _ in range(2)]  # two fixed packed batches, seen over and over
    fn, sharding = _compiled(env, batches[0])
    losses = []
    for i in range(80):
        env["state"], m = _run(env, batches[i % 2], fn, sharding)
        losses.append(float(m["loss"]))
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("stage,frozen", [("vision", ("llm",)), ("sft", ("vision",))])
def test_frozen_groups_stay_bit_identical(synthetic, stage, frozen):
    from qwenvl_jax.train.config import STAGES

    env = _setup(synthetic, groups=STAGES[stage])
    before = jax.tree.map(np.asarray, env["state"].params)
    batch = _stack([next(iter(env["ds"]))])
    fn, sharding = _compiled(env, batch)
    for _ in range(2):
        env["state"], m = _run(env, batch, fn, sharding)
    after = jax.tree.map(np.asarray, env["state"].params)
    mask = steplib.trainable_mask(before, STAGES[stage])
    changed = {g: False for g in steplib.GROUPS}
    for (path, a), b, train in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after),
                                   jax.tree.leaves(mask)):
        group = steplib.param_group(tuple(str(getattr(k, "key", k)) for k in path))
        if group in frozen:
            assert np.array_equal(a, b), path
        elif not np.array_equal(a, b):
            changed[group] = True
    assert all(changed[g] for g in STAGES[stage])
    # Frozen parameters hold no optimizer state: AdamW moments cover the trainable ones only.
    n_moments = sum(x.size for x in jax.tree.leaves(env["state"].opt_state) if x.ndim > 0)
    n_train = sum(a.size for a, t in zip(jax.tree.leaves(before), jax.tree.leaves(mask)) if t)
    assert n_moments == 2 * n_train


def test_sharded_step_equals_single_device(synthetic):
    """Two steps on one device vs a (2, 2, 2) mesh of 8: same loss, grad norm and parameters.
    (Adam's eps is raised here: with eps=1e-8 an element whose gradient is ~1e-9 moves by about
    +-lr either way, so summation order alone could flip it.)"""
    single = _setup(synthetic, eps=1e-3)
    sharded = _setup(synthetic, mesh="data=2,fsdp=2,tensor=2", eps=1e-3)
    batch = _stack([next(iter(single["ds"]))])
    out = []
    for env in (single, sharded):
        fn, sharding = _compiled(env, batch)
        state, m = _run(env, batch, fn, sharding)
        state, m = _run(dict(env, state=state), batch, fn, sharding)
        out.append((float(m["loss"]), jax.tree.map(np.asarray, state.params), float(m["grad_norm"])))
        assert len(jax.tree.leaves(state.params)[0].sharding.device_set) == env["layout"].size
    assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0])
    assert abs(out[0][2] - out[1][2]) <= 1e-5 * abs(out[0][2])
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
