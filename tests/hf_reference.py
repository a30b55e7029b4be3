"""Tiny random transformers Qwen2.5-VL models: the numerical reference for parity tests.

Built offline in about a second; float32 and eager attention so differences are ours alone.
Norm weights and biases are randomised too (HF initialises them to 1 / 0, which would hide
mistakes in how they are applied).
"""

from __future__ import annotations

import numpy as np
import torch

# Token ids inside the tiny vocabulary (512).
TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)

SHAPES = {
    # untied lm_head, 112 px windows (8x8 patches), 2 of 4 ViT blocks full attention, GQA 2:1
    "untied_w112": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3]),
        vision=dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2,
                    fullatt_block_indexes=[1, 3], window_size=112),
        tie_word_embeddings=False),
    # tied embeddings, 56 px windows (4x4 patches), GQA 2:1 with head_dim 32, 3-head ViT
    "tied_w56": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, mrope_section=[4, 6, 6]),
        vision=dict(depth=3, hidden_size=48, intermediate_size=64, num_heads=3,
                    fullatt_block_indexes=[2], window_size=56),
        tie_word_embeddings=True),
}


def hf_config(shape: str, tokens: dict | None = None):
    from transformers import Qwen2_5_VLConfig

    s = SHAPES[shape]
    t = dict(s["text"])
    section = t.pop("mrope_section")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**t, rms_norm_eps=1e-6, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}),
        vision_config=dict(**s["vision"], out_hidden_size=t["hidden_size"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2),
        tie_word_embeddings=s["tie_word_embeddings"], **(tokens or TOKENS))
    cfg._attn_implementation = "eager"
    return cfg


def build_hf_model(shape: str, seed: int = 0, tokens: dict | None = None):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(shape, tokens)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, **batch) -> np.ndarray:
    """Runs the HF model on numpy inputs (HF key names) and returns float32 logits."""
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items() if v is not None}
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


def rel_err(ours, ref, mask=None) -> float:
    """max |diff| / std(reference), over the rows selected by mask [B, L] if given."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        m = np.asarray(mask, bool)
        ours, ref = ours[m], ref[m]
    return float(np.abs(ours - ref).max() / ref.std())


def hf_greedy(model, steps: int, *, input_ids, position_ids, attention_mask=None, **vision) -> np.ndarray:
    """Reference greedy decode: a full forward per step with explicit training-rule positions.

    Each new token gets (largest position of its row) + 1 on all three axes. Returns [B, steps].
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    pos = np.asarray(position_ids, np.int64)
    out = []
    for _ in range(steps):
        logits = hf_logits(model, input_ids=ids, attention_mask=mask, position_ids=pos, **vision)
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
        nxt = np.where(mask > 0, pos.max(0), -1).max(1) + 1  # [B]
        ids = np.concatenate([ids, tok[:, None]], 1)
        mask = np.concatenate([mask, np.ones_like(tok)[:, None]], 1)
        pos = np.concatenate([pos, np.broadcast_to(nxt[None, :, None], (3, len(tok), 1))], 2)
    return np.stack(out, 1)
