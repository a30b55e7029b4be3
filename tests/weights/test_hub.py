"""Hub ids through a local cache laid out as huggingface_hub's (no network): `infer --checkpoint org/name
--adapter org/lora` with HF_HUB_OFFLINE=1 answers as peft's model does; a missing file is one line."""

import copy
import json
import os
import shutil
import subprocess
import sys

import peft
import torch
from hf_reference import hf_greedy

from qwenvl_jax import Processor, get_rope_index

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cached_repo(cache, repo_id, files):
    """models--org--name/{refs/main, snapshots/<commit>/...} with `files` {name: source path or text}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        if isinstance(src, str):
            (snapshot / name).write_text(src)
        else:
            shutil.copy(src, snapshot / name)


def _infer(cache, *argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "home"))
    return subprocess.run([sys.executable, "-m", "qwenvl_jax.infer", *map(str, argv)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_offline_hub_ids_for_checkpoint_and_adapter(chat_checkpoint, tmp_path):
    path, hf, ids = chat_checkpoint
    cache = tmp_path / "hub"
    _cached_repo(cache, "org/tiny-vl", {p.name: p for p in path.iterdir()})
    lora = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "qkv"],
                                                                  init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)  # big enough to change greedy tokens
    lora.save_pretrained(tmp_path / "lora")
    _cached_repo(cache, "org/tiny-lora", {p.name: p for p in (tmp_path / "lora").iterdir()})

    r = _infer(cache, "--checkpoint", "org/tiny-vl", "--adapter", "org/tiny-lora", "--prompt", "Hi",
               "--max-new-tokens", 6, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    processor = Processor.from_pretrained(path)
    batch = processor(text=processor.apply_chat_template([{"role": "user", "content": "Hi"}]))
    pos, _ = get_rope_index(batch["input_ids"], image_token_id=ids["image_token_id"],
                            video_token_id=ids["video_token_id"])
    ref = hf_greedy(lora, 6, input_ids=batch["input_ids"], position_ids=pos)
    assert result["token_ids"] == ref[0].tolist()
    assert result["token_ids"] != hf_greedy(hf, 6, input_ids=batch["input_ids"], position_ids=pos)[0].tolist()

    # a sharded repo whose second shard is not in the cache: one line naming it, exit 1
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    _cached_repo(cache, "org/partial", {"config.json": path / "config.json",
                                        "model.safetensors.index.json": json.dumps(index),
                                        "model-00001-of-00002.safetensors": path / "model.safetensors"})
    r = _infer(cache, "--checkpoint", "org/partial", "--prompt", "Hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: org/partial: model-00002-of-00002.safetensors is not in the "
                                             "local hub cache (HF_HUB_OFFLINE=1)"]
    r = _infer(cache, "--checkpoint", "org/absent", "--prompt", "Hi")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "org/absent: no such directory, nor a hub repository with config.json" in r.stderr
