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
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from qwenvl_jax.pretrained import load_pretrained

TOKENS = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)


def small_config(dtype: str) -> Qwen2_5_VLConfig:
    """A small but not trivial model: 8 ViT blocks (2 full), 4 decoder layers, GQA 4:1."""
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=8, hidden_size=256, intermediate_size=688, num_heads=4, out_hidden_size=512,
                           fullatt_block_indexes=[3, 7], window_size=112, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2),
        tie_word_embeddings=False, **TOKENS)
    cfg.dtype = getattr(torch, dtype)
    return cfg


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


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

    g = args.image // 14
    grid = np.array([[1, g, g]])
    rng = np.random.default_rng(0)
    pv = rng.standard_normal((g * g, 1176)).astype(np.float32)
    n_img = g * g // 4
    half = args.text_tokens // 2
    ids = np.array([list(rng.integers(0, 900, half)) + [TOKENS["vision_start_token_id"]]
                    + [TOKENS["image_token_id"]] * n_img + [TOKENS["vision_end_token_id"]]
                    + list(rng.integers(0, 900, args.text_tokens - half))])
    batch = dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid)

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
