"""Every checkpoint form a PyTorch user holds: .bin (single, sharded), both key layouts, tied or not,
dtype "auto", and which files of a directory are read. References: transformers' own files and
logits, and the safetensors copy of the same weights."""

import copy
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from hf_reference import hf_logits, rel_err
from safetensors.numpy import load_file, save_file

from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.weights import torch_bin
from qwenvl_jax.weights.load import CheckpointError


def _batch(image_token_id=500):
    rng = np.random.default_rng(1)
    ids = np.array([[3, 4, 502] + [image_token_id] * 24 + [503, 5, 6, 7]])
    return dict(input_ids=ids, pixel_values=rng.standard_normal((96, 1176)).astype(np.float32),
                image_grid_thw=np.array([(1, 8, 12)]))


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(model.params)]


def _assert_same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _write_bin(state: dict, out, shards: int = 1):
    """A .bin checkpoint as transformers 4.x wrote it: torch.save of the state dict, or of its
    parts with pytorch_model.bin.index.json."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(state)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return
    weight_map = {}
    for k, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({names[i]: state[names[i]] for i in part}, out / file)
        weight_map.update({names[i]: file for i in part})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shape", ["untied_w112", "tied_w56"])
def test_bin_checkpoints_match_safetensors_bit_for_bit(tiny_checkpoint, shape, tmp_path):
    """bf16 .bin (single and 3 shards, transformers' in-memory key layout model.language_model.*) loads
    bit-identical to the safetensors copy transformers wrote (published layout); dtype "auto" is
    the checkpoint's bf16; the float32 .bin gives transformers' logits."""
    src, hf = tiny_checkpoint(shape)
    bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    safe = tmp_path / "safe"
    bf16.save_pretrained(safe)
    state = {k: v.clone() for k, v in bf16.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    reference = load_pretrained(safe)  # dtype "auto": the checkpoint's bfloat16
    assert _leaves(reference)[0].dtype == jax.numpy.bfloat16
    for shards in (1, 3):
        d = tmp_path / f"bin{shards}"
        _write_bin(state, d, shards)
        (d / "config.json").write_text((safe / "config.json").read_text())
        _assert_same_params(load_pretrained(d), reference)

    f32 = tmp_path / "f32"
    _write_bin({k: v.clone() for k, v in hf.state_dict().items()}, f32)
    (f32 / "config.json").write_text((src / "config.json").read_text())
    ours = load_pretrained(f32)  # float32 config -> float32 params
    assert _leaves(ours)[0].dtype == np.float32
    b = _batch()
    mm = (b["input_ids"] == 500).astype(np.int64)
    assert rel_err(ours(**b), hf_logits(hf, **b, mm_token_type_ids=mm)) <= 1e-4


def test_key_layouts_load_the_same(tiny_checkpoint, tmp_path):
    """The safetensors file renamed to transformers >= 4.52's layout (model.language_model.*,
    model.visual.*) loads the same params as the published layout."""
    src, _ = tiny_checkpoint("untied_w112")
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
    assert set(renamed) != set(tensors)
    out = tmp_path / "new_layout"
    out.mkdir()
    save_file(renamed, str(out / "model.safetensors"))
    (out / "config.json").write_text((src / "config.json").read_text())
    _assert_same_params(load_pretrained(out, dtype="float32"), load_pretrained(src, dtype="float32"))


class _NotATensor:
    pass


def test_bin_errors_are_one_line(tiny_checkpoint, tmp_path, monkeypatch):
    src, _ = tiny_checkpoint("tied_w56")
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": _NotATensor()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: refused: it holds more than tensors") as e:
        load_pretrained(d)
    assert "\n" not in str(e.value)
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"expected a state dict of tensors .* got a list"):
        load_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a readable PyTorch checkpoint"):
        load_pretrained(d)
    monkeypatch.setattr(torch_bin, "_import_torch", lambda: None)
    with pytest.raises(CheckpointError, match=r"needs torch \(pip install 'qwenvl_jax\[torch\]'\), or convert"):
        load_pretrained(d)


def test_only_the_files_transformers_reads(tiny_checkpoint, tmp_path):
    """A stray *.safetensors beside model.safetensors is never read; a directory of unnamed files,
    an index that misplaces a tensor, DeepSpeed ZeRO folders and empty ZeRO-3 tensors: one line each."""
    src, _ = tiny_checkpoint("tied_w56")
    tensors = load_file(str(src / "model.safetensors"))
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(d / "model.safetensors"))
    save_file({k: np.zeros_like(v) for k, v in tensors.items()}, str(d / "zz-old-copy.safetensors"))
    _assert_same_params(load_pretrained(d, dtype="float32"), load_pretrained(src, dtype="float32"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: a file; give the checkpoint's directory"):
        load_pretrained(d / "model.safetensors")

    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors, .*found \['zz-old-copy.safetensors'\]"):
        load_pretrained(d)

    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:5]}, str(d / "a.safetensors"))
    save_file({k: tensors[k] for k in names[5:]}, str(d / "b.safetensors"))
    weight_map = {k: "b.safetensors" for k in names}  # the first five are not in b
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"b.safetensors: does not hold \["):
        load_pretrained(d)

    zero = tmp_path / "zero"
    (zero / "global_step10").mkdir(parents=True)
    (zero / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (zero / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"DeepSpeed ZeRO checkpoint .*zero_to_fp32.py .*--safe_serialization"):
        load_pretrained(zero)

    empty = dict(tensors, **{"model.layers.0.mlp.up_proj.weight": np.zeros((0,), np.float32)})
    save_file(empty, str(zero / "model.safetensors"))  # weights present: they are read, and checked
    with pytest.raises(CheckpointError, match=r"has shape \[0\], expected .*ZeRO-3"):
        load_pretrained(zero)


def test_convert_bin_to_safetensors(tiny_checkpoint, tmp_path):
    """convert: a bf16 .bin checkpoint -> safetensors with the same bits (dtype kept)."""
    src, hf = tiny_checkpoint("untied_w112")
    bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    d = tmp_path / "bin"
    _write_bin({k: v.clone() for k, v in bf16.state_dict().items()}, d, shards=2)
    bf16.save_pretrained(tmp_path / "safe")  # for its config.json, which names bfloat16
    (d / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "qwenvl_jax.convert", "--checkpoint", str(d), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = load_file(str(out / "model.safetensors"))
    for name, t in bf16.state_dict().items():
        name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        ref = t.view(torch.int16).numpy()
        assert np.array_equal(got[name].view(np.int16), ref), name


def test_export_leaves_no_stale_weight_files(tiny_checkpoint, tmp_path):
    """Re-exporting into a directory that holds another checkpoint's weights (a single file, more
    shards, .bin files) leaves only the new ones, so the directory reads back as what was written."""
    src, _ = tiny_checkpoint("tied_w56")
    model = load_pretrained(src, dtype="float32")
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_bytes=20_000)
    many = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(many) > 3
    torch.save({"x": torch.zeros(1)}, out / "pytorch_model.bin")
    model.save_pretrained(out)  # one file now
    weights = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin") or "index" in p.name)
    assert weights == ["model.safetensors"]
    model.save_pretrained(out, max_shard_bytes=60_000)  # fewer shards than the first time
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in names and len([n for n in names if n.startswith("model-")]) < len(many)
    _assert_same_params(load_pretrained(out, dtype="float32"), model)
