"""HF safetensors in and out: transformers loads our export and gives the same logits."""

import copy
import dataclasses
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_reference import hf_logits, rel_err
from safetensors.numpy import load_file, save_file
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, Qwen2_5_VLForConditionalGeneration

from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.pretrained import init_model, load_pretrained
from qwenvl_jax.processing.processor import Processor
from qwenvl_jax.weights.export import SIDE_FILES
from qwenvl_jax.weights.hf_keys import canonical_name
from qwenvl_jax.weights.load import CheckpointError


def _batch():
    rng = np.random.default_rng(0)
    grid = (1, 8, 12)
    ids = np.array([[3, 4, 502] + [500] * 24 + [503, 5, 6, 7]])
    return dict(input_ids=ids, pixel_values=rng.standard_normal((96, 1176)).astype(np.float32),
                image_grid_thw=np.array([grid]))


def test_export_roundtrip_sharded(tiny_checkpoint, shape, tmp_path):
    path, hf = tiny_checkpoint(shape)
    ours = load_pretrained(path, dtype="float32")
    out = ours.save_pretrained(tmp_path / "export", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    on_disk = {canonical_name(k) for k in hf.state_dict()}
    assert set(index["weight_map"]) == on_disk - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    for name, ref in hf.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], ref, rtol=0, atol=0, msg=name)
    b = _batch()
    mm = (b["input_ids"] == 500).astype(np.int64)
    assert rel_err(hf_logits(reloaded, **b, mm_token_type_ids=mm), hf_logits(hf, **b, mm_token_type_ids=mm)) == 0
    assert rel_err(load_pretrained(out, dtype="float32")(**b), ours(**b)) == 0


@pytest.mark.parametrize("mesh", [None, "data=2,fsdp=2,tensor=2"])
def test_stacked_layers_load_the_same_either_way(tiny_checkpoint, monkeypatch, mesh):
    """Stacked layer parameters are stacked on the host when small and written layer by layer
    into the sharded stack when large: both give every parameter bit for bit, in its sharding."""
    from qwenvl_jax.weights import load

    path, hf = tiny_checkpoint("untied_w112")
    on_host = load_pretrained(path, dtype="float32", mesh=mesh)
    monkeypatch.setattr(load, "STACK_ON_HOST_BYTES", 0)
    per_layer = load_pretrained(path, dtype="float32", mesh=mesh)
    for a, b in zip(jax.tree.leaves(on_host.params), jax.tree.leaves(per_layer.params), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref = {canonical_name(k): v.numpy() for k, v in hf.state_dict().items()}
    q0 = on_host.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(q0)[1], ref["model.layers.1.self_attn.q_proj.weight"].T)


def test_bf16_checkpoint_and_export(tiny_checkpoint, tmp_path):
    _, hf = tiny_checkpoint("untied_w112")
    hf_bf16 = tmp_path / "bf16"
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(hf_bf16, max_shard_size="100KB")
    assert (hf_bf16 / "model.safetensors.index.json").is_file()
    ours = load_pretrained(hf_bf16, dtype="bfloat16")
    out = ours.save_pretrained(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = {k: v for f in hf_bf16.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    got = load_file(str(out / "model.safetensors"))
    assert set(ref) == set(got)
    for name, t in ref.items():
        assert t.dtype == ml_dtypes.bfloat16 and np.array_equal(got[name], t), name
    logits = np.asarray(ours(**_batch()), np.float32)
    assert np.isfinite(logits).all()


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint and its tensors."""
    src, _ = tiny_checkpoint("untied_w112")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst, load_file(str(dst / "model.safetensors"))


def test_missing_tensor(broken):
    path, tensors = broken
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' "
                                              r"\(expected shape \[96, 64\]\)"):
        load_pretrained(path, dtype="float32")


def test_misshaped_tensor(broken):
    path, tensors = broken
    tensors["visual.blocks.2.attn.qkv.weight"] = np.zeros((96, 30), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'visual.blocks.2.attn.qkv.weight' has shape \[96, 30\], "
                                              r"expected \[96, 32\]"):
        load_pretrained(path, dtype="float32")


def test_unexpected_tensor(broken):
    path, tensors = broken
    tensors["model.layers.7.self_attn.q_proj.weight"] = np.zeros((64, 64), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model.layers.7"):
        load_pretrained(path, dtype="float32")


def test_corrupt_file(broken):
    path, _ = broken
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(path, dtype="float32")


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path / "nope")


def test_export_of_a_preset_built_model_loads_in_transformers(tmp_path):
    """A model made from a preset (YAML floats, e.g. tokens_per_second 2.0), not from an HF
    config.json, must still export a config transformers accepts, with the same logits."""
    # special ids inside the demo preset's 1536-token vocab, as the train CLI sets them
    config = dataclasses.replace(Qwen25VLConfig.from_preset("demo"), image_token_id=1500, video_token_id=1501,
                                 vision_start_token_id=1502, vision_end_token_id=1503)
    assert isinstance(config.vision.tokens_per_second, float)
    ours = init_model(config, seed=0)
    out = ours.save_pretrained(tmp_path / "export")
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    b = _batch()
    b["input_ids"] = np.array([[3, 4, config.vision_start_token_id] + [config.image_token_id] * 24
                               + [config.vision_end_token_id, 5, 6, 7]])
    mm = (b["input_ids"] == config.image_token_id).astype(np.int64)
    assert rel_err(hf_logits(reloaded, **b, mm_token_type_ids=mm), np.asarray(ours(**b))) <= 1e-4


def test_save_pretrained_writes_a_complete_checkpoint(chat_checkpoint, tmp_path):
    """load_pretrained(dir).save_pretrained(out) copies dir's tokenizer, chat template, processor and
    generation configs, so our Processor and transformers' processor load from out; a model with no
    source directory writes weights + config.json only, unless given side_files_from."""
    src, _, ids = chat_checkpoint
    model = load_pretrained(src, dtype="float32")
    out = model.save_pretrained(tmp_path / "out")
    # weights get the permissions every other new file gets (safetensors alone creates them 0600)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    side = {p.name for p in src.iterdir()} & set(SIDE_FILES)
    assert side >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                    "generation_config.json"}
    for name in side:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert Processor.from_pretrained(out).image_token_id == ids["image_token_id"]
    try:  # AutoProcessor builds the video processor too, which needs torchvision
        import torchvision  # noqa: F401
        from transformers import AutoProcessor

        hf = AutoProcessor.from_pretrained(out)
        tokenizer, image_processor = hf.tokenizer, hf.image_processor
    except ImportError:  # its other parts, as AutoProcessor loads them
        tokenizer, image_processor = AutoTokenizer.from_pretrained(out), AutoImageProcessor.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == ids["image_token_id"] and tokenizer.chat_template
    assert image_processor.patch_size == 14
    assert GenerationConfig.from_pretrained(out).to_dict() == GenerationConfig.from_pretrained(src).to_dict()

    model.source_dir = None  # as init_model's
    bare = model.save_pretrained(tmp_path / "bare")
    assert {p.name for p in bare.iterdir()} == {"config.json", "model.safetensors"}
    given = model.save_pretrained(tmp_path / "given", side_files_from=src)
    assert {p.name for p in given.iterdir()} == {p.name for p in out.iterdir()}
