"""Generation speed of our engine vs HF transformers' `generate`, and vs the machine's own limits,
side by side in one run.

    python bench/generate.py [--model small] [--new-tokens 64] [--image 224] [--batches 1,8]
                             [--long 4096] [--runs 5]

Same random checkpoint and prompt (text + one image per row), greedy, exactly --new-tokens tokens
(no stop token). Measured in the same run:
* the machine's stream bandwidth (the best of a large f32 matrix-vector product and a large sum)
  and its f32 matmul peak (a 2048^3 product), both through XLA on this machine;
* ours: prefill time and the decode step time (decode time / steps, from the engine's timers,
  compile time excluded); HF: prefill = one forward over the prompt, decode step = the median gap
  between consecutive calls of a stopping criterion (once per generated token);
* each decode step as a fraction of its roofline: (bytes of the text weights + bytes of the filled
  KV cache) / stream bandwidth, over the measured step time; each prefill as a fraction of the
  matmul peak (analytic FLOPs of the ViT and the LLM over the prompt);
* each decode step over its matmul floor: the same step's matmuls alone (weights, both attention
  products over the whole cache buffer, the head), chained as in the model, compiled by XLA on this
  machine: the part of the step that is not ours to speed up;
* a long-cache case: one text prompt filling --long cache slots.
Each figure is the median over --runs runs, with the min-max spread. Ratios > 1: we are faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import CONFIGS, TOKENS, image_batch
from transformers import Qwen2_5_VLForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from qwenvl_jax.buckets import bucket
from qwenvl_jax.flops import text_forward_flops_per_token, vision_forward_flops_per_patch
from qwenvl_jax.generation.decode import compile_stats, generate
from qwenvl_jax.pretrained import load_pretrained


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def fmt(s: dict, scale: float = 1e3, unit: str = "ms") -> str:
    return f"{s['median'] * scale:.2f} {unit} ({s['min'] * scale:.2f}-{s['max'] * scale:.2f})"


# -- the machine's limits ------------------------------------------------------------------------

def _median_time(fn, *args, runs: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stream_bandwidth(mb: int = 256, runs: int = 10) -> dict:
    """Bytes/s of reading `mb` MB of f32 through a matrix-vector product and through a sum."""
    n = int((mb * 2**20 / 4) ** 0.5)
    w = jnp.ones((n, n), jnp.float32)
    x = jnp.ones((n,), jnp.float32)
    matvec = _median_time(jax.jit(lambda w, x: w @ x), w, x, runs=runs)
    total = _median_time(jax.jit(lambda w: w.sum()), w, runs=runs)
    nbytes = w.size * 4
    return {"matvec_gb_s": nbytes / matvec / 1e9, "sum_gb_s": nbytes / total / 1e9,
            "bytes_per_s": nbytes / min(matvec, total)}


def matmul_peak(n: int = 2048, runs: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    return 2 * n**3 / _median_time(jax.jit(lambda a, b: a @ b), a, a, runs=runs)


def matmul_floor(model, batch: int, slots: int, runs: int) -> float:
    """Seconds XLA takes for a decode step's matmuls alone: every layer's q/k/v/o and MLP products
    and its two attention products against a `slots`-slot cache (in our cache layouts), then the
    output head, at this batch, chained as in the model (each layer reads the previous layer's
    output) with only adds and a product between them: no norms, rotary, softmax, masks, cache
    writes or sampling. What our step costs above it is ours; the floor itself is this machine's
    matmul kernels (XLA:CPU's small-M products stream below the stream bandwidth)."""
    t = model.config.text
    hd, nq, nk, width = t.head_dim, t.num_attention_heads, t.num_key_value_heads, t.hidden_size
    key = iter(jax.random.split(jax.random.key(0), 16 * t.num_hidden_layers + 4))

    def rand(*shape):
        return jax.random.normal(next(key), shape, jnp.float32) * 0.02

    layers = [dict(q=rand(width, nq * hd), k=rand(width, nk * hd), v=rand(width, nk * hd), o=rand(nq * hd, width),
                   gate=rand(width, t.intermediate_size), up=rand(width, t.intermediate_size),
                   down=rand(t.intermediate_size, width), k_cache=rand(batch, nk, hd, slots),
                   v_cache=rand(batch, nk, slots, hd)) for _ in range(t.num_hidden_layers)]
    head = rand(width, t.vocab_size)

    def step(h, layers, head):
        for w in layers:
            q = (h @ w["q"]).reshape(batch, nk, nq // nk, hd)
            q = q + (h @ w["k"] + h @ w["v"]).reshape(batch, nk, 1, hd)  # keeps k, v live
            scores = jnp.einsum("bkgd,bkds->bkgs", q, w["k_cache"])
            h = h + jnp.einsum("bkgs,bksd->bkgd", scores, w["v_cache"]).reshape(batch, -1) @ w["o"]
            h = h + ((h @ w["gate"]) * (h @ w["up"])) @ w["down"]
        return h @ head

    return _median_time(jax.jit(step), rand(batch, width), layers, head, runs=max(20, 4 * runs))


# -- what a step must move / compute -------------------------------------------------------------

def text_weight_bytes(model) -> int:
    """Bytes a decode step must read of the weights: every decoder layer, the final norm and the
    output projection (a tied head reads the embedding; an untied one reads lm_head, and the
    embedding lookup reads one row per token)."""
    lm = model.params["language_model"]
    total = sum(x.nbytes for x in jax.tree.leaves(lm["layers"])) + sum(x.nbytes for x in jax.tree.leaves(lm["norm"]))
    head = lm["embed_tokens"] if model.config.tie_word_embeddings else model.params["lm_head"]
    return total + sum(x.nbytes for x in jax.tree.leaves(head))


def cache_bytes(model, batch: int, filled: float) -> float:
    t = model.config.text
    itemsize = jax.tree.leaves(model.params)[0].dtype.itemsize
    return 2 * t.num_hidden_layers * batch * t.num_key_value_heads * t.head_dim * itemsize * filled


def prefill_flops(model, batch: dict) -> float:
    tokens = batch["input_ids"].size
    patches = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    per_token = text_forward_flops_per_token(model.config, batch["input_ids"].shape[1] / 2)
    return tokens * per_token + patches * vision_forward_flops_per_patch(model.config)


# -- the two engines ------------------------------------------------------------------------------

class _StepTimes(StoppingCriteria):
    """Called once per generated token by HF's generate: the gaps are its decode steps."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def hf_times(hf, batch: dict, new_tokens: int, runs: int) -> tuple[list[float], list[float]]:
    tb = {k: torch.as_tensor(v) for k, v in batch.items()}
    if "pixel_values" in batch:
        tb["mm_token_type_ids"] = torch.as_tensor((batch["input_ids"] == TOKENS["image_token_id"]).astype(np.int64))
    prefill, steps = [], []
    with torch.inference_mode():
        hf(**tb, use_cache=True)  # warm
        for _ in range(runs):
            t = time.perf_counter()
            hf(**tb, use_cache=True)
            prefill.append(time.perf_counter() - t)
        for _ in range(runs):
            timer = _StepTimes()
            out = hf.generate(**tb, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0, stopping_criteria=StoppingCriteriaList([timer]))
            assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
            steps.append(statistics.median(np.diff(timer.stamps)))
    return prefill, steps


def ours_times(model, batch: dict, new_tokens: int, runs: int) -> tuple[list[float], list[float], int]:
    inputs = model.prepare(**batch)
    kw = dict(max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0)
    generate(model, inputs, **kw)  # compile
    outs = [generate(model, inputs, **kw) for _ in range(runs)]
    assert all(len(t) == new_tokens for t in outs[0].token_ids)
    slots = bucket(bucket(batch["input_ids"].shape[1]) + new_tokens)
    return [o.prefill_s for o in outs], [o.decode_s / o.decode_steps for o in outs], slots


def text_batch(tokens: int, batch: int = 1) -> dict:
    ids = np.random.default_rng(1).integers(0, 900, (1, tokens))
    return {"input_ids": np.repeat(ids, batch, 0)}


def replicate(batch: dict, n: int) -> dict:
    return dict(input_ids=np.repeat(batch["input_ids"], n, 0), pixel_values=np.tile(batch["pixel_values"], (n, 1)),
                image_grid_thw=np.repeat(batch["image_grid_thw"], n, 0))


def compare(name, ours, hf, batch, new_tokens, runs, bandwidth, peak) -> dict:
    b, prompt = batch["input_ids"].shape
    o_pre, o_step, slots = ours_times(ours, batch, new_tokens, runs)
    h_pre, h_step = hf_times(hf, batch, new_tokens, runs)
    filled = prompt + new_tokens / 2  # mean filled cache over the decode
    step_bytes = text_weight_bytes(ours) + cache_bytes(ours, b, filled)
    roofline_s = step_bytes / bandwidth
    floor_s = matmul_floor(ours, b, slots, runs)
    flops = prefill_flops(ours, batch)
    r = {"batch": b, "prompt_tokens": prompt, "cache_slots": slots,
         "ours_prefill_s": spread(o_pre), "hf_prefill_s": spread(h_pre),
         "ours_step_s": spread(o_step), "hf_step_s": spread(h_step),
         "step_roofline_s": roofline_s, "step_bytes": step_bytes, "step_matmul_floor_s": floor_s,
         "ours_step_over_matmul_floor": statistics.median(o_step) / floor_s,
         "ours_decode_tok_s": b / statistics.median(o_step), "hf_decode_tok_s": b / statistics.median(h_step),
         "decode_vs_hf": statistics.median(h_step) / statistics.median(o_step),
         "prefill_vs_hf": statistics.median(h_pre) / statistics.median(o_pre),
         "ours_decode_of_roofline": roofline_s / statistics.median(o_step),
         "hf_decode_of_roofline": roofline_s / statistics.median(h_step),
         "ours_prefill_of_peak": flops / statistics.median(o_pre) / peak,
         "hf_prefill_of_peak": flops / statistics.median(h_pre) / peak}
    print(f"{name} (batch {b}, prompt {prompt}, {slots} cache slots):\n"
          f"  prefill  ours {fmt(r['ours_prefill_s'])} vs hf {fmt(r['hf_prefill_s'])}: {r['prefill_vs_hf']:.2f}x; "
          f"of matmul peak: ours {r['ours_prefill_of_peak']:.0%}, hf {r['hf_prefill_of_peak']:.0%}\n"
          f"  decode   ours {fmt(r['ours_step_s'])}/step vs hf {fmt(r['hf_step_s'])}/step: {r['decode_vs_hf']:.2f}x; "
          f"roofline {roofline_s * 1e3:.2f} ms ({step_bytes / 1e6:.1f} MB/step): "
          f"ours {r['ours_decode_of_roofline']:.0%}, hf {r['hf_decode_of_roofline']:.0%}; "
          f"{r['ours_decode_tok_s']:.0f} vs {r['hf_decode_tok_s']:.0f} tok/s\n"
          f"  the step's matmuls alone (XLA, same shapes, chained): {floor_s * 1e3:.2f} ms = "
          f"{roofline_s / floor_s:.0%} of roofline; our step is {r['ours_step_over_matmul_floor']:.2f}x that",
          flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--long", type=int, default=4096, help="cache slots of the long-cache case (0: skip it)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="small", choices=sorted(CONFIGS),
                    help="small: weights dominate a decode step; tiny: framework overhead does")
    args = ap.parse_args()

    bw = stream_bandwidth()
    peak = matmul_peak()
    print(f"machine: stream {bw['bytes_per_s'] / 1e9:.1f} GB/s (matvec {bw['matvec_gb_s']:.1f}, "
          f"sum {bw['sum_gb_s']:.1f}); f32 matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(CONFIGS[args.model]("float32")).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, dtype="float32")
    print(f"model {args.model}: text weights read per step {text_weight_bytes(ours) / 1e6:.1f} MB", flush=True)

    results = {"model": args.model, "stream_gb_s": bw["bytes_per_s"] / 1e9, "matmul_gflop_s": peak / 1e9}
    base = image_batch(args.image, 48)
    for b in [int(x) for x in args.batches.split(",")]:
        results[f"batch{b}"] = compare("image prompt", ours, hf, replicate(base, b), args.new_tokens, args.runs,
                                       bw["bytes_per_s"], peak)
    if args.long:
        # the longest prompt whose bucket + new tokens still fit --long cache slots
        prompt = max(p for p in range(1, args.long) if bucket(bucket(p) + args.new_tokens) <= args.long)
        results["long"] = compare("long text prompt", ours, hf, text_batch(prompt), args.new_tokens, args.runs,
                                  bw["bytes_per_s"], peak)
    if "batch1" in results and "batch8" in results:
        decode = {b: results[b]["ours_decode_tok_s"] for b in ("batch1", "batch8")}
        results["batch8_over_batch1_tok_s"] = decode["batch8"] / decode["batch1"]
        print(f"batch 8 decodes {results['batch8_over_batch1_tok_s']:.1f}x the tokens/s of batch 1")

    before = compile_stats()["compiles"]
    for text_tokens in (40, 47, 53, 61, 70):  # 5 prompt lengths around one image
        batch = image_batch(args.image, text_tokens, seed=text_tokens)
        generate(ours, ours.prepare(**batch), max_new_tokens=8, eos_token_ids=[], pad_token_id=0)
    results["compiles_for_5_prompt_lengths"] = compile_stats()["compiles"] - before
    print(f"compilations over 5 prompt lengths: {results['compiles_for_5_prompt_lengths']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
