"""Shared by the benchmarks: one small Qwen2.5-VL config, inputs, and a timer.

Run the benchmarks from the repository root (`python bench/forward.py`); this directory is then
on sys.path.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig

TOKENS = dict(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)


def tiny_config(dtype: str) -> Qwen2_5_VLConfig:
    """The test-sized model: per-step cost is framework overhead, not arithmetic."""
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], window_size=112, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2),
        tie_word_embeddings=False, **TOKENS)
    cfg.dtype = getattr(torch, dtype)
    return cfg


def small_config(dtype: str) -> Qwen2_5_VLConfig:
    """A small but not trivial model: 8 ViT blocks (2 full), 8 decoder layers 512 wide, GQA 4:1 (~96 MB
    of f32 text weights, so a decode step is bound by reading them)."""
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
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


CONFIGS = {"tiny": tiny_config, "small": small_config}


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out




def image_batch(image_px: int = 448, text_tokens: int = 64, seed: int = 0) -> dict:
    """One prompt: text, a square image of image_px pixels, text; random pixels (HF key names)."""
    g = image_px // 14
    rng = np.random.default_rng(seed)
    half = text_tokens // 2
    ids = np.array([list(rng.integers(0, 900, half)) + [TOKENS["vision_start_token_id"]]
                    + [TOKENS["image_token_id"]] * (g * g // 4) + [TOKENS["vision_end_token_id"]]
                    + list(rng.integers(0, 900, text_tokens - half))])
    return dict(input_ids=ids, pixel_values=rng.standard_normal((g * g, 1176)).astype(np.float32),
                image_grid_thw=np.array([[1, g, g]]))
