"""Forward time of our jitted model vs HF transformers' PyTorch model, side by side on one machine.

    python bench/forward.py [--image 448] [--text-tokens 64] [--runs 10] [--dtype float32]

Same random checkpoint (written by transformers, loaded by us), same inputs (one image + text).
Prints one line per model and the ratio HF time / our time (> 1 means we are faster). Compile time
is reported separately and excluded from the ratio. Absolute times mean something only on the
machine they were taken on; compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from common import TOKENS, image_batch, small_config, timed
from transformers import Qwen2_5_VLForConditionalGeneration

from qwenvl_jax.pretrained import load_pretrained


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", type=int, default=448, help="square image side in pixels (multiple of 28)")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(small_config(args.dtype)).eval().to(getattr(torch, args.dtype))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_pretrained(d, dtype=args.dtype)

    batch = image_batch(args.image, args.text_tokens)
    ids, pv = batch["input_ids"], batch["pixel_values"]

    t = time.perf_counter()
    inputs = ours.prepare(**batch)
    jax.block_until_ready(ours.forward(inputs))
    compile_s = time.perf_counter() - t
    ours_t = timed(lambda: jax.block_until_ready(ours.forward(ours.prepare(**batch))), args.runs)

    tb = {k: torch.as_tensor(v) for k, v in batch.items()}
    tb["mm_token_type_ids"] = torch.as_tensor((ids == TOKENS["image_token_id"]).astype(np.int64))
    with torch.inference_mode():
        hf(**tb)  # warm-up
        hf_t = timed(lambda: hf(**tb), args.runs)

    ours_med, hf_med = statistics.median(ours_t), statistics.median(hf_t)
    result = {"tokens": int(ids.shape[1]), "patches": int(pv.shape[0]), "dtype": args.dtype,
              "backend": jax.default_backend(), "ours_s": round(ours_med, 4), "hf_s": round(hf_med, 4),
              "ours_compile_s": round(compile_s, 2), "speedup_vs_hf": round(hf_med / ours_med, 2)}
    print(f"ours (jax, jit) : {ours_med * 1e3:8.1f} ms/forward  (first call incl. compile {compile_s:.1f} s)")
    print(f"hf (torch)      : {hf_med * 1e3:8.1f} ms/forward  (attn: {hf.config._attn_implementation})")
    print(f"ratio hf/ours   : {hf_med / ours_med:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
