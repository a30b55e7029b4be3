"""The training run: model + data + optimizer + orbax checkpoints, resumable after preemption.

Checkpoints (output_dir/checkpoints, orbax CheckpointManager, async, last K kept) hold the train
state and the data iterator, so a resumed run continues with exactly the batches it would have
seen. SIGTERM (TPU preemption) finishes the current step, saves, and exits; the next start
resumes from the latest checkpoint, onto whatever mesh it is given.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from qwenvl_jax import distributed
from qwenvl_jax.config import ConfigError, Qwen25VLConfig
from qwenvl_jax.data.pipeline import SampleEncoder, make_dataset, open_source, skip_report
from qwenvl_jax.data.sources import resolve_data_root
from qwenvl_jax.flops import PEAK_BF16_TFLOPS, train_flops_per_token, vision_flops_per_patch
from qwenvl_jax.model.qwen25vl import Qwen25VL
from qwenvl_jax.pretrained import resolve_dtype, with_attention_impl
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.sharding import Layout, param_shardings
from qwenvl_jax.train import step as steplib
from qwenvl_jax.train.config import TrainConfig
from qwenvl_jax.train.synthetic import write_synthetic_dataset
from qwenvl_jax.weights import hub
from qwenvl_jax.weights.export import save_hf_checkpoint
from qwenvl_jax.weights.load import abstract_model, load_params


class _Preemption:
    """SIGTERM sets a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def say(*args, **kwargs):
    if distributed.is_main_process():
        print(*args, **kwargs)


def preset_config(preset: str, processor: Processor) -> Qwen25VLConfig:
    """A from-scratch model's config: the preset, with the special token ids of the tokenizer it
    will be trained with."""
    hf = Qwen25VLConfig.from_preset(preset).to_hf_dict()
    hf.update(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
              vision_start_token_id=processor.vision_start_token_id, vision_end_token_id=processor.vision_end_token_id)
    return Qwen25VLConfig.from_hf_dict(hf)


def _model_and_tokenizer(cfg: TrainConfig, out: Path):
    """(model config, init_from as a local directory (a hub id resolved) or None, tokenizer directory,
    data file, data root: data.root, else the data file's directory)."""
    data_path, root = cfg.data.path, cfg.data.root
    init_from = str(hub.resolve(cfg.model.init_from)) if cfg.model.init_from else None
    tokenizer = cfg.model.tokenizer or init_from
    if data_path == "synthetic":
        synth = out / "synthetic_data"
        if distributed.is_main_process():
            write_synthetic_dataset(synth)
        _sync("synthetic data")
        data_path, root, tokenizer = str(synth / "train.jsonl"), str(synth), tokenizer or str(synth)
    if tokenizer is None:
        raise ConfigError("model.tokenizer: a from-scratch model needs a tokenizer directory")
    if init_from:
        config = Qwen25VLConfig.from_hf_file(init_from)
    else:
        config = preset_config(cfg.model.preset, Processor.from_pretrained(tokenizer))
    config = with_attention_impl(config, cfg.model.attention_impl)
    return config, init_from, tokenizer, data_path, resolve_data_root(data_path, root)


def _restore_latest_readable(mngr, make_args, out: Path):
    """(step, restored) from the newest checkpoint that restores. An unreadable one (a write cut
    short, a corrupted file) is moved to output_dir/checkpoints_unreadable/ with a warning, and the
    one before it is tried; none readable is one error naming the folder."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            return step, mngr.restore(step, args=make_args())
        except Exception as e:  # noqa: BLE001 - whatever orbax raises for a damaged step, try the previous
            text = str(e).strip().splitlines()
            reason = f"{type(e).__name__}: {text[0][:200] if text else ''}"
            aside = out / "checkpoints_unreadable" / str(step)
            after = f"resuming from step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier checkpoint"
            say(f"warning: checkpoint step {step} cannot be restored ({reason}); moved to {aside}; {after}",
                file=sys.stderr)
            if distributed.is_main_process():
                aside.parent.mkdir(parents=True, exist_ok=True)
                (Path(mngr.directory) / str(step)).rename(aside.with_name(f"{step}-{int(time.time())}")
                                                           if aside.exists() else aside)
            _sync(f"set aside checkpoint {step}")
            mngr.reload()
    raise ConfigError(f"{out / 'checkpoints'}: no checkpoint can be restored (tried steps {steps}; "
                      f"they are in {out / 'checkpoints_unreadable'})")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the metrics rows of steps <= `step` (and drops a line cut short by a kill)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()

    def step_of(line):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    keep = [line for line in lines if (n := step_of(line)) is not None and n <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(cfg: TrainConfig) -> dict:
    """Trains from scratch, from model.init_from, or on from the latest checkpoint up to train.steps.
    Returns the metrics of the last step this call ran (with "stopped" when it stopped early); {}
    when it ran none (resumed from a checkpoint at train.steps: only the export, if any, is done)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = Layout.create(cfg.mesh or "data=1,fsdp=-1,tensor=1")
    config, init_from, tokenizer_dir, data_path, data_root = _model_and_tokenizer(cfg, out)
    layout = layout.for_model(config)
    t = cfg.train
    param_dtype, compute_dtype = resolve_dtype(t.param_dtype), resolve_dtype(t.compute_dtype)

    # Model: graphdef computes in compute_dtype; params (master weights) in param_dtype, sharded.
    graphdef, abstract = abstract_model(config, param_dtype, compute_dtype)
    shardings = nnx.to_pure_dict(param_shardings(abstract, layout))
    if init_from:
        _, loaded = load_params(init_from, config, param_dtype=param_dtype, dtype=compute_dtype,
                                layout=layout)
        params = nnx.to_pure_dict(loaded)
    else:
        def create():
            model = Qwen25VL(config, rngs=nnx.Rngs(t.seed), param_dtype=param_dtype, dtype=compute_dtype)
            return nnx.to_pure_dict(nnx.state(model))
        params = jax.jit(create, out_shardings=shardings)()
    tx, schedule = steplib.make_optimizer(cfg.optim, t.steps, params, cfg.trainable)
    state_abstract = jax.eval_shape(lambda p: steplib.init_state(p, tx), params)
    state_sharding = steplib.state_shardings(state_abstract, shardings, tx, layout)
    state = jax.jit(lambda p: steplib.init_state(p, tx), out_shardings=state_sharding)(params)
    dpo = t.stage == "dpo"
    # DPO's frozen reference model: the initial weights (re-created identically on resume).
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params) if dpo else None
    del params

    # Data: this process's shard of the shuffled records.
    processor = Processor.from_pretrained(tokenizer_dir)
    data = cfg.data.config
    if dpo:
        from qwenvl_jax.train.dpo import PairEncoder, make_pair_dataset

        patches_budget, slots_budget = data.budgets(config.vision.window_patches)
        pairs = PairEncoder(processor, config, data.seq_len, data_root=data_root, patch_budget=patches_budget,
                            slot_budget=slots_budget, max_items=data.max_items, min_pixels=data.min_pixels,
                            max_pixels=data.max_pixels)
        dataset = make_pair_dataset(open_source(data_path), pairs, config, data, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    else:
        encoder = SampleEncoder(processor, config, data, data_root=data_root)
        dataset = make_dataset(open_source(data_path), encoder, config, data, process_index=jax.process_index(),
                               process_count=jax.process_count())
    iterator = iter(dataset)

    # Checkpoints: resume from the latest if there is one.
    mngr = ocp.CheckpointManager(
        (out / "checkpoints").resolve(),
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(cfg.checkpoint.keep),
            enable_async_checkpointing=cfg.checkpoint.async_save))
    start = 0
    if mngr.latest_step() is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state_abstract,
                              state_sharding)
        start, restored = _restore_latest_readable(mngr, lambda: ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(iterator)), out)
        state = restored["state"]
        say(f"resumed from step {start} ({out / 'checkpoints'})", file=sys.stderr)
        if start > t.steps:
            raise ConfigError(f"train.steps={t.steps} is below step {start} of the checkpoint in "
                              f"{out / 'checkpoints'}: raise train.steps, or give a new output_dir")
        if start == t.steps:
            say(f"train.steps={t.steps} already done: no step to run", file=sys.stderr)
        if distributed.is_main_process():  # steps past the checkpoint (a kill) are run again: drop their rows
            _truncate_metrics(out / "metrics.jsonl", start)

    _, slots = data.budgets(config.vision.window_patches)
    step_cfg = steplib.StepConfig(groups=cfg.trainable, remat=t.remat, window_len=config.vision.window_patches,
                                  max_full_len=data.item_slots(config.vision.window_patches),
                                  max_bad_steps=t.max_bad_steps, loss_chunk=t.loss_chunk)
    flops_token = train_flops_per_token(config, data.seq_len)
    flops_patch = vision_flops_per_patch(config)
    peak = PEAK_BF16_TFLOPS.get(jax.devices()[0].device_kind)
    metrics_file = open(out / "metrics.jsonl", "a")
    compiled, batch_sharding = None, None
    preempt = _Preemption()
    skips = {}
    last = {}

    def next_host_batch():
        """This process's next batch on the host, and its skip counts (added when it is used)."""
        host = [next(iterator) for _ in range(t.grad_accum)]
        local = {k: np.stack([b[k] for b in host]) for k in host[0] if k not in ("num_samples", "skip_counts")}
        return local, skip_report(host)

    try:
        # The next batch is read from the data pipeline while the device runs a step, except before a
        # checkpoint (or a SIGTERM's save): the iterator saved with step N's state has then given
        # exactly N batches, so a resumed run reads what an uninterrupted one would.
        pending = next_host_batch() if start < t.steps else None
        for step in range(start, t.steps):
            local, batch_skips = pending
            for reason, n in batch_skips.items():
                skips[reason] = skips.get(reason, 0) + n
            if compiled is None:
                abstract_batch = {k: jax.ShapeDtypeStruct((v.shape[0], v.shape[1] * jax.process_count(),
                                                           *v.shape[2:]), v.dtype) for k, v in local.items()}
                t0 = time.perf_counter()
                compiled, batch_sharding = steplib.compile_step(state_abstract, abstract_batch, graphdef=graphdef,
                                                                tx=tx, layout=layout, cfg=step_cfg,
                                                                state_sharding=state_sharding,
                                                                dpo_beta=t.dpo_beta if dpo else None)
                say(f"compiled the train step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            batch = {k: jax.make_array_from_process_local_data(batch_sharding[k], v) for k, v in local.items()}
            t0 = time.perf_counter()
            state, m = compiled(state, batch, ref_params) if dpo else compiled(state, batch)  # runs asynchronously
            done = step + 1
            save_due = done % cfg.checkpoint.every == 0 or done == t.steps
            read_ahead = not save_due and not preempt.requested
            pending = next_host_batch() if read_ahead else None
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            tokens = int(np.sum(local["segment_ids"] > 0)) * jax.process_count()
            patches = int(np.sum(local["full_segment_ids"] > 0)) * jax.process_count()
            achieved = (flops_token * tokens + flops_patch * patches) / dt
            last = {"step": step + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                    "lr": float(schedule(step)), "tokens": int(m["tokens"]), "tokens_per_s": tokens / dt,
                    "step_s": dt, "mfu": achieved / (peak * 1e12 * jax.device_count()) if peak else None,
                    "skipped_updates": int(jax.device_get(state.skipped_updates)), "data_skips": dict(skips),
                    **{k: float(m[k]) for k in ("rewards_chosen", "rewards_rejected", "reward_accuracy") if k in m}}
            if distributed.is_main_process():
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                    print(f"step {step + 1}/{t.steps} loss {last['loss']:.4f} lr {last['lr']:.2e} "
                          f"grad {last['grad_norm']:.3f} tok/s {last['tokens_per_s']:.0f}", file=sys.stderr,
                          flush=True)
            if int(jax.device_get(state.bad_steps)) >= t.max_bad_steps:
                say(f"stopping: {t.max_bad_steps} non-finite steps in a row; the last good checkpoint is kept",
                    file=sys.stderr)
                return {**last, "stopped": "non_finite"}
            stop = preempt.requested and not read_ahead  # after a read-ahead: one more step, then save
            if save_due or stop:
                mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=grain.checkpoint.CheckpointSave(iterator)))
            if stop:
                mngr.wait_until_finished()
                say(f"SIGTERM: saved step {done}, exiting", file=sys.stderr)
                return {**last, "stopped": "preempted"}
            if pending is None and done < t.steps:
                pending = next_host_batch()
        mngr.wait_until_finished()
        if cfg.export_hf:
            params = nnx.merge(graphdef, state.params)
            # every process joins; process 0 writes, with the tokenizer, template and processor: a complete checkpoint
            save_hf_checkpoint(cfg.export_hf, nnx.state(params), config, side_files_from=tokenizer_dir)
            say(f"exported HF checkpoint to {cfg.export_hf}", file=sys.stderr)
        return last
    finally:
        preempt.restore()
        metrics_file.close()
        mngr.wait_until_finished()
        mngr.close()
