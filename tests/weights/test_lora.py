"""PEFT LoRA adapters merged at load: logits against peft's own PeftModel forward (the reference),
and the adapters users cannot load get one line naming the problem."""

import copy
import json

import jax
import numpy as np
import peft
import pytest
import torch
from hf_reference import build_hf_model, hf_logits, rel_err
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from qwenvl_jax import convert
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.weights.load import CheckpointError

# decoder attention + MLP, vision attention (fused qkv, proj) + MLP, merger
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "attn.proj",
           "mlp.0", "mlp.2"]


def _batch():
    rng = np.random.default_rng(2)
    ids = np.array([[3, 4, 502] + [500] * 24 + [503, 5, 6, 7, 8]])
    return dict(input_ids=ids, pixel_values=rng.standard_normal((96, 1176)).astype(np.float32),
                image_grid_thw=np.array([(1, 8, 12)]), mm_token_type_ids=(ids == 500).astype(np.int64))


def _adapter(shape, tmp_path, **lora_kwargs):
    """(base checkpoint dir, adapter dir, PeftModel) with random non-zero A and B everywhere."""
    base = build_hf_model(shape, seed=3)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                             alpha_pattern={"v_proj": 3}, modules_to_save=["lm_head"], **lora_kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model


def test_lora_matches_peft_and_converts_to_a_merged_checkpoint(tmp_path):
    base_dir, adapter_dir, peft_model = _adapter("untied_w112", tmp_path, target_modules=TARGETS)
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(".visual.blocks." in k for k in keys) and any(".visual.merger." in k for k in keys)
    assert keys["base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    b = _batch()
    ref = hf_logits(peft_model, **b)
    base_logits = hf_logits(Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir).eval(), **b)
    assert rel_err(base_logits, ref) > 1e-2  # the adapter matters

    ours = load_pretrained(base_dir, adapter=adapter_dir, dtype="float32")
    assert rel_err(ours(**b), ref) <= 1e-4

    # the older key layout (base_model.model.model.layers..., base_model.model.visual...) merges the same
    old = tmp_path / "old_layout"
    old.mkdir()
    (old / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    renamed = {k.replace("model.model.language_model.", "model.model.").replace("model.model.visual.", "model.visual.")
               : v for k, v in keys.items()}
    save_file(renamed, str(old / "adapter_model.safetensors"))
    again = load_pretrained(base_dir, adapter=old, dtype="float32")
    for x, y in zip(jax.tree.leaves(again.params), jax.tree.leaves(ours.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))

    # convert: base + adapter -> one checkpoint transformers loads with peft's logits
    out = tmp_path / "merged"
    assert convert.main(["--checkpoint", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert rel_err(hf_logits(merged, **b), ref) <= 1e-4


def test_rslora_embedding_and_tied_head(tmp_path):
    """use_rslora (scaling alpha / sqrt(r)), LoRA on the embedding, and a tied base whose head the
    adapter replaces (modules_to_save): the merged model has an untied head, as peft's forward."""
    base_dir, adapter_dir, peft_model = _adapter("tied_w56", tmp_path, use_rslora=True,
                                                 target_modules=TARGETS + ["embed_tokens"])
    keys = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert any(k.endswith("embed_tokens.lora_embedding_A") for k in keys)
    b = _batch()
    ours = load_pretrained(base_dir, adapter=adapter_dir, dtype="float32")
    assert ours.config.tie_word_embeddings is False
    assert rel_err(ours(**b), hf_logits(peft_model, **b)) <= 1e-4


def _write_adapter(d, config: dict, tensors: dict):
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, str(d / "adapter_model.safetensors"))


Q = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("config,tensors,message", [
    ({"use_dora": True}, {f"{Q}.lora_A.weight": np.ones((2, 64), np.float32)}, r"DoRA adapters are not supported"),
    ({"peft_type": "IA3"}, {}, r"peft_type 'IA3' is not supported"),
    ({"r": float("nan")}, {}, r"r must be a positive number, got nan"),
    ({}, {f"{Q}.lora_A.weight": np.zeros((0,), np.float32), f"{Q}.lora_B.weight": np.zeros((0,), np.float32)},
     r"has shape \[0\] \(an empty tensor: DeepSpeed ZeRO-3"),
    ({}, {f"{Q}.lora_A.weight": np.ones((2, 64), np.float32)}, r"only one of its LoRA factors"),
    ({}, {f"{Q}.lora_A.weight": np.ones((2, 63), np.float32), f"{Q}.lora_B.weight": np.ones((64, 2), np.float32)},
     r"shapes \[2, 63\] and \[64, 2\], which do not fit the base tensor's \[64, 64\]"),
    ({}, {Q.replace("layers.0", "layers.9") + ".lora_A.weight": np.ones((2, 64), np.float32),
          Q.replace("layers.0", "layers.9") + ".lora_B.weight": np.ones((64, 2), np.float32)},
     r"changes 'model.layers.9.self_attn.q_proj.weight', which the base checkpoint .* does not hold"),
    ({}, {f"{Q}.lora_magnitude_vector": np.ones((64,), np.float32)}, r"a DoRA adapter"),
    ({"alpha_pattern": {"q_proj": "big"}}, {f"{Q}.lora_A.weight": np.ones((2, 64), np.float32),
                                           f"{Q}.lora_B.weight": np.ones((64, 2), np.float32)},
     r"r and lora_alpha must be positive numbers, got 2 and 'big'"),
])
def test_bad_adapters_are_one_line(tiny_checkpoint, tmp_path, config, tensors, message):
    base_dir, _ = tiny_checkpoint("untied_w112")
    bad = tmp_path / "bad"
    _write_adapter(bad, config, tensors)
    with pytest.raises(CheckpointError, match=message) as e:
        load_pretrained(base_dir, adapter=bad, dtype="float32")
    assert "\n" not in str(e.value)


def test_convert_with_a_bad_adapter_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    base_dir, _ = tiny_checkpoint("untied_w112")
    out = tmp_path / "out"
    assert convert.main(["--checkpoint", str(base_dir), "--adapter", str(tmp_path / "missing"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: adapter directory not found" in err
    assert not out.exists()
