"""Config: presets parse, both config.json forms load, bad values name their key."""

import json

import pytest
from hf_reference import hf_config
from transformers import Qwen2_5_VLConfig as HFConfig

from qwenvl_jax.config import CONFIGS_DIR, ConfigError, Qwen25VLConfig

PUBLISHED_7B = {  # the hub config.json of Qwen2.5-VL-7B-Instruct (published flat form)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


@pytest.mark.parametrize("path", sorted((CONFIGS_DIR / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_parses(path):
    Qwen25VLConfig.from_preset(path)


def test_published_form_equals_preset():
    assert Qwen25VLConfig.from_hf_dict(PUBLISHED_7B) == Qwen25VLConfig.from_preset("7b")


def test_partial_vision_config_takes_released_values():
    d = dict(PUBLISHED_7B, vision_config={"hidden_size": 1280, "in_chans": 3, "out_hidden_size": 3584,
                                          "spatial_patch_size": 14, "tokens_per_second": 2})
    assert Qwen25VLConfig.from_hf_dict(d) == Qwen25VLConfig.from_preset("7b")


@pytest.mark.parametrize("shape", ["untied_w112", "tied_w56"])
def test_transformers5_nested_form(shape, tmp_path):
    hf_config(shape).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in written  # 5.x writes the nested form
    cfg = Qwen25VLConfig.from_hf_file(tmp_path)
    ref = hf_config(shape)
    assert cfg.text.hidden_size == ref.text_config.hidden_size
    assert cfg.text.mrope_section == tuple(ref.text_config.rope_parameters["mrope_section"])
    assert cfg.vision.window_size == ref.vision_config.window_size
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings


def test_to_hf_dict_loads_in_transformers():
    cfg = Qwen25VLConfig.from_preset("3b")
    hf = HFConfig(**cfg.to_hf_dict())
    assert hf.text_config.hidden_size == 2048 and hf.text_config.num_key_value_heads == 2
    assert hf.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert hf.vision_config.tokens_per_second == 2 and hf.vision_config.out_hidden_size == 2048
    assert hf.tie_word_embeddings is True
    assert Qwen25VLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change,key", [
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, "mrope_section"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "llava"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "rope type"),
])
def test_bad_values_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key):
        Qwen25VLConfig.from_hf_dict({**PUBLISHED_7B, **change})


def test_unknown_preset_key_is_an_error(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("text:\n  hidden_sise: 64\n")
    with pytest.raises(ConfigError, match="hidden_sise"):
        Qwen25VLConfig.from_preset(p)


# Every numeric field of the published form, top level and vision_config.
_NUMERIC = ([k for k, v in PUBLISHED_7B.items() if type(v) in (int, float) and k in {
    "bos_token_id", "eos_token_id", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "hidden_size", "intermediate_size", "max_position_embeddings", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_theta", "vocab_size"}]
            + [f"vision_config.{k}" for k, v in PUBLISHED_7B["vision_config"].items() if type(v) in (int, float)])


def _with(key, value):
    d = json.loads(json.dumps(PUBLISHED_7B))
    node = d["vision_config"] if key.startswith("vision_config.") else d
    node[key.split(".")[-1]] = value
    twin = {"spatial_patch_size": "patch_size", "in_chans": "in_channels"}.get(key.split(".")[-1])
    node.pop(twin, None)  # the legacy alias counts only when the current name is absent
    return d


def test_wrongly_typed_numbers_name_their_key():
    """Strings for numbers, NaN/inf, booleans, negative or zero sizes: ConfigError naming the key,
    for every numeric field (never a TypeError or a model built from them)."""
    assert len(_NUMERIC) >= 20
    for key in _NUMERIC:
        name = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}.get(key.split(".")[-1],
                                                                                key.split(".")[-1])
        for bad in ("64", float("nan"), float("inf"), True, -1, [3]):
            if key == "eos_token_id" and bad == [3]:
                continue  # a list of eos ids is valid
            with pytest.raises(ConfigError, match=name):
                Qwen25VLConfig.from_hf_dict(_with(key, bad))


@pytest.mark.parametrize("doc,needle", [
    ([1, 2], "the file must be a JSON object, got list"),
    ({"text_config": "big"}, "text_config must be a JSON object"),
    ({"vision_config": [1]}, "vision_config must be a JSON object"),
    ({"rope_scaling": "mrope"}, "rope_scaling must be a JSON object"),
    ({"vision_config": {"fullatt_block_indexes": "7,15"}}, "fullatt_block_indexes: expected a list of integers"),
])
def test_wrongly_shaped_config_json(tmp_path, doc, needle):
    if isinstance(doc, dict):
        doc = {**PUBLISHED_7B, **doc}
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=needle):
        Qwen25VLConfig.from_hf_file(tmp_path)
