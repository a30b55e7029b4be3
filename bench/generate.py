"""Generation speed of our engine vs HF transformers' `generate`, side by side on one machine.

    python bench/generate.py [--new-tokens 64] [--image 224] [--batches 1,8]

Same random checkpoint and prompt (text + one image per row), greedy, exactly --new-tokens tokens
(no stop token). HF's prefill is one forward over the prompt; its decode rate is
(new_tokens - 1) * batch / (time of generate(new_tokens) - time of generate(1)). Ours comes from the
engine's own prefill/decode timers, compile time excluded. Also counts our compilations over 5
different prompt lengths. Prints ratios (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from common import CONFIGS, TOKENS, image_batch
from transformers import Qwen2_5_VLForConditionalGeneration

from qwenvl_jax.generation.decode import compile_stats, generate
from qwenvl_jax.pretrained import load_pretrained


def replicate(batch: dict, n: int) -> dict:
    return dict(input_ids=np.repeat(batch["input_ids"], n, 0), pixel_values=np.tile(batch["pixel_values"], (n, 1)),
                image_grid_thw=np.repeat(batch["image_grid_thw"], n, 0))


def hf_times(hf, batch: dict, new_tokens: int, runs: int = 3) -> tuple[float, float]:
    tb = {k: torch.as_tensor(v) for k, v in batch.items()}
    tb["mm_token_type_ids"] = torch.as_tensor((batch["input_ids"] == TOKENS["image_token_id"]).astype(np.int64))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        best = float("inf")
        for _ in range(runs):
            t = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(**tb, max_new_tokens=n, min_new_tokens=n, **kw)
            best = min(best, time.perf_counter() - t)
            assert out.shape[1] == batch["input_ids"].shape[1] + n
        return best

    prefill, full = run(1), run(new_tokens)
    b = batch["input_ids"].shape[0]
    return prefill, (new_tokens - 1) * b / (full - prefill)


def ours_times(model, batch: dict, new_tokens: int, runs: int = 3) -> tuple[float, float]:
    inputs = model.prepare(**batch)
    generate(model, inputs, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0)  # compile
    outs = [generate(model, inputs, max_new_tokens=new_tokens, eos_token_ids=[], pad_token_id=0) for _ in range(runs)]
    assert all(len(t) == new_tokens for t in outs[0].token_ids)
    return min(o.prefill_s for o in outs), max(o.decode_tokens_per_s for o in outs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--model", default="small", choices=sorted(CONFIGS),
                    help="small: weights dominate a decode step; tiny: framework overhead does")
    args = ap.parse_args()

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(CONFIGS[args.model]("float32")).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, dtype="float32")

    results = {"model": args.model}
    base = image_batch(args.image, 48)
    for b in [int(x) for x in args.batches.split(",")]:
        batch = replicate(base, b)
        o_pre, o_tps = ours_times(ours, batch, args.new_tokens)
        h_pre, h_tps = hf_times(hf, batch, args.new_tokens)
        results[f"batch{b}"] = {"ours_prefill_s": round(o_pre, 4), "hf_prefill_s": round(h_pre, 4),
                                "prefill_speedup": round(h_pre / o_pre, 2), "ours_decode_tok_s": round(o_tps, 1),
                                "hf_decode_tok_s": round(h_tps, 1), "decode_speedup": round(o_tps / h_tps, 2)}
        r = results[f"batch{b}"]
        print(f"batch {b}: prefill ours {o_pre * 1e3:.1f} ms vs hf {h_pre * 1e3:.1f} ms ({r['prefill_speedup']}x); "
              f"decode ours {o_tps:.1f} tok/s vs hf {h_tps:.1f} tok/s ({r['decode_speedup']}x)")

    before = compile_stats()["compiles"]
    for text_tokens in (40, 47, 53, 61, 70):  # 5 prompt lengths around one image
        batch = image_batch(args.image, text_tokens, seed=text_tokens)
        generate(ours, ours.prepare(**batch), max_new_tokens=8, eos_token_ids=[], pad_token_id=0)
    results["compiles_for_5_prompt_lengths"] = compile_stats()["compiles"] - before
    print(f"compilations over 5 prompt lengths: {results['compiles_for_5_prompt_lengths']}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
