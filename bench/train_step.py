"""Train-step throughput: compile time, step time, tokens/s and an MFU estimate.

    python bench/train_step.py [--model tiny|small] [--steps 5] [--seq-len 512] [--batch 2]
                               [--remat full] [--compute-dtype float32] [--peak-tflops X]

Real data path: the generated synthetic dataset through the packing pipeline, the same train
step (AdamW, f32 master params) as `python -m qwenvl_jax.train`. FLOPs per step count the real
(non-padding) tokens and patches with `flops.train_flops_per_token` / `vision_flops_per_patch`. MFU
needs a peak: the TPU table in `qwenvl_jax.train.loop`, or `--peak-tflops` (per device); on CPU
without it, only the achieved GFLOP/s is printed. Ends with one JSON line of all numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder, make_dataset, open_source
from qwenvl_jax.flops import PEAK_BF16_TFLOPS, train_flops_per_token, vision_flops_per_patch
from qwenvl_jax.model.qwen25vl import Qwen25VL
from qwenvl_jax.pretrained import resolve_dtype
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.sharding import Layout, param_shardings
from qwenvl_jax.train import step as steplib
from qwenvl_jax.train.config import OptimSpec
from qwenvl_jax.train.synthetic import write_synthetic_dataset
from qwenvl_jax.weights.load import abstract_model


def model_config(name: str, processor: Processor) -> Qwen25VLConfig:
    """The preset (tiny) or bench/common.py's small config, with the tokenizer's special ids."""
    if name == "tiny":
        hf = Qwen25VLConfig.from_preset("tiny").to_hf_dict()
    else:
        from common import small_config  # bench/ is on sys.path when run as a script

        hf = small_config("float32").to_dict()
    tok = processor.tokenizer
    hf.update(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
              vision_start_token_id=tok.token_to_id("<|vision_start|>"),
              vision_end_token_id=tok.token_to_id("<|vision_end|>"))
    config = Qwen25VLConfig.from_hf_dict(hf)
    need = max(hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))
    need = max(need + 1, tok.vocab_size)
    assert config.text.vocab_size >= need, f"vocab {config.text.vocab_size} < tokenizer's {need}"
    return config


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak, for MFU off TPU")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        synth = write_synthetic_dataset(Path(tmp) / "synth", samples=64)
        processor = Processor.from_pretrained(synth)
        config = model_config(args.model, processor)
        data = DataConfig(seq_len=args.seq_len, patch_budget=2 * args.seq_len, batch_size=args.batch,
                          epochs=None, packing_bins=8)
        ds = make_dataset(open_source(synth / "train.jsonl"), SampleEncoder(processor, config, data, data_root=synth),
                          config, data)
        it = iter(ds)
        host = [{k: v[None] for k, v in next(it).items() if k not in ("num_samples", "skip_counts")}
                for _ in range(args.steps + 1)]  # [accum=1, rows, ...]; loaded before any timing

    layout = Layout.create("data=1,fsdp=-1,tensor=1").for_model(config)
    graphdef, abstract = abstract_model(config, resolve_dtype("float32"), resolve_dtype(args.compute_dtype))
    shardings = nnx.to_pure_dict(param_shardings(abstract, layout))
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Qwen25VL(config, rngs=nnx.Rngs(0)))),
                     out_shardings=shardings)()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx, _ = steplib.make_optimizer(OptimSpec(learning_rate=1e-4, warmup_steps=1), args.steps + 1, params,
                                   steplib.GROUPS)
    state_abstract = jax.eval_shape(lambda p: steplib.init_state(p, tx), params)
    state_sharding = steplib.state_shardings(state_abstract, shardings, tx, layout)
    state = jax.jit(lambda p: steplib.init_state(p, tx), out_shardings=state_sharding)(params)
    del params
    _, slots = data.budgets(config.vision.window_patches)
    cfg = steplib.StepConfig(groups=steplib.GROUPS, remat=args.remat, window_len=config.vision.window_patches,
                             max_full_len=data.item_slots(config.vision.window_patches), max_bad_steps=1 << 30)

    batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host[0].items()}
    t0 = time.perf_counter()
    compiled, batch_sharding = steplib.compile_step(state_abstract, batch_abstract, graphdef=graphdef, tx=tx,
                                                    layout=layout, cfg=cfg, state_sharding=state_sharding)
    compile_s = time.perf_counter() - t0
    put = lambda b: {k: jax.device_put(v, batch_sharding[k]) for k, v in b.items()}  # noqa: E731

    t0 = time.perf_counter()  # warm-up step: first run (allocation etc.), not timed with the rest
    state, m = jax.block_until_ready(compiled(state, put(host[0])))
    first_s = time.perf_counter() - t0
    times, losses = [], [float(m["loss"])]
    for b in host[1:]:
        b = jax.block_until_ready(put(b))
        t0 = time.perf_counter()
        state, m = jax.block_until_ready(compiled(state, b))
        times.append(time.perf_counter() - t0)
        losses.append(float(m["loss"]))

    tokens = np.mean([np.sum(b["segment_ids"] > 0) for b in host[1:]])
    patches = np.mean([np.sum(b["full_segment_ids"] > 0) for b in host[1:]])
    padded = args.batch * args.seq_len
    step_s = statistics.median(times)
    f_tok, f_patch = train_flops_per_token(config, args.seq_len), vision_flops_per_patch(config)
    flops = f_tok * tokens + f_patch * patches
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or PEAK_BF16_TFLOPS.get(kind)
    mfu = flops / step_s / (peak * 1e12 * jax.device_count()) if peak else None
    r = dict(model=args.model, device=kind, devices=jax.device_count(), params=n_params, seq_len=args.seq_len,
             batch=args.batch, remat=args.remat, compute_dtype=args.compute_dtype, compile_s=compile_s,
             first_step_s=first_s, step_s=step_s, step_s_mean=statistics.mean(times), steps=len(times),
             tokens_per_step=float(tokens), padded_tokens_per_step=padded, patches_per_step=float(patches),
             tokens_per_s=tokens / step_s, padded_tokens_per_s=padded / step_s,
             token_efficiency=tokens / padded, flops_per_step=flops, achieved_gflops=flops / step_s / 1e9,
             peak_tflops=peak, mfu=mfu, loss_first=losses[0], loss_last=losses[-1])

    rows = [("model", f"{args.model} ({n_params / 1e6:.2f}M params, {args.compute_dtype}, remat={args.remat})"),
            ("device", f"{kind} x{jax.device_count()}"),
            ("batch", f"{args.batch} rows x {args.seq_len} tokens; {tokens:.0f} real tokens, {patches:.0f} patches"),
            ("compile", f"{compile_s:.2f} s (first step {first_s:.3f} s)"),
            ("step", f"{step_s * 1e3:.1f} ms median, {r['step_s_mean'] * 1e3:.1f} ms mean over {len(times)}"),
            ("tokens/s", f"{r['tokens_per_s']:.0f} real, {r['padded_tokens_per_s']:.0f} padded "
                         f"({r['token_efficiency']:.0%} real)"),
            ("FLOP/s", f"{r['achieved_gflops']:.2f} GFLOP/s ({flops / 1e9:.2f} GFLOP/step)"),
            ("MFU", f"{mfu:.2%} of {peak} TFLOP/s" if mfu is not None
             else "n/a (no known peak for this device; pass --peak-tflops)"),
            ("loss", f"{losses[0]:.3f} -> {losses[-1]:.3f}")]
    for k, v in rows:
        print(f"{k:>9}  {v}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
