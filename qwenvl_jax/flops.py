"""Analytic FLOPs of Qwen2.5-VL, and the TPU chips' peaks they are measured against.

XLA's `cost_analysis()` counts a scanned layer stack's body once, so step FLOPs are counted here
(MaxText's convention: training = 3 x forward, causal attention at half).
"""

from __future__ import annotations

from qwenvl_jax.config import Qwen25VLConfig

# Per chip: peak dense bf16 TFLOP/s and HBM GB/s (Cloud TPU's published figures).
CHIP_PEAKS = {"v4": (275, 1228), "v5e": (197, 819), "v5p": (459, 2765), "v6e": (918, 1640)}
# jax's device_kind -> family
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
PEAK_BF16_TFLOPS = {kind: CHIP_PEAKS[family][0] for kind, family in DEVICE_KINDS.items()}


def text_forward_flops_per_token(config: Qwen25VLConfig, context: int) -> float:
    """Forward FLOPs of one token through the LLM attending to `context` keys on average:
    2 per weight (lm_head included) plus 4 * context * width per layer for QK^T and PV."""
    t = config.text
    per_layer = 2 * (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
                     + t.num_attention_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    attention = 4 * context * t.num_attention_heads * t.head_dim
    return t.num_hidden_layers * (per_layer + attention) + 2 * t.hidden_size * t.vocab_size


def train_flops_per_token(config: Qwen25VLConfig, seq_len: int) -> float:
    """3 x forward FLOPs of the LLM per token of a causal seq_len row (a token attends to seq_len / 2
    keys on average); the ViT is counted per patch separately."""
    return 3.0 * text_forward_flops_per_token(config, seq_len / 2)


def vision_forward_flops_per_patch(config: Qwen25VLConfig) -> float:
    v = config.vision
    per_block = 2 * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
    return v.depth * per_block + 2 * v.patch_dim * v.hidden_size


def vision_flops_per_patch(config: Qwen25VLConfig) -> float:
    return 3.0 * vision_forward_flops_per_patch(config)
