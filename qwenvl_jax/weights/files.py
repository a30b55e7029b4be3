"""Which files of a checkpoint directory hold its tensors, found the way transformers finds them.

In transformers' order: `model.safetensors`, `model.safetensors.index.json` (and the shards it
names), `pytorch_model.bin`, `pytorch_model.bin.index.json`. Nothing else in the directory is read,
so a stray or old `*.safetensors` file beside them can never replace a tensor. Folders that hold a
checkpoint in another form (DeepSpeed ZeRO partitions) are recognised and named in the error.
"""

from __future__ import annotations

import json
from pathlib import Path

SAFE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE, SAFE_INDEX, BIN, BIN_INDEX)
# Tokenizer, chat template, processor and generation settings: what a complete checkpoint holds
# beside its weights (copied next to exported weights, fetched with a hub id).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
              "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
              "generation_config.json", "special_tokens_map.json", "added_tokens.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def weight_files(directory: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """(the files to read, the index's tensor -> file map or None for a single file)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: checkpoint directory not found")
    for single, index in ((SAFE, SAFE_INDEX), (BIN, BIN_INDEX)):
        if (d / single).is_file():
            return [d / single], None
        if (d / index).is_file():
            weight_map = read_index(d / index)
            files = [d / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: listed in {index} but missing")
            return files, weight_map
    zero = deepspeed_zero_folder(d)
    if zero is not None:
        raise CheckpointError(
            f"{d}: a DeepSpeed ZeRO checkpoint ({zero}), which holds optimizer partitions, not model weights: "
            f"run `python {d / 'zero_to_fp32.py'} {d} OUT_DIR --safe_serialization` (the script DeepSpeed "
            "saves there), copy config.json and the tokenizer files into OUT_DIR, and load OUT_DIR")
    others = sorted(p.name for p in d.glob("*.safetensors")) + sorted(p.name for p in d.glob("*.bin"))
    hint = (f"; found {others[:3]}, which transformers would not read either (rename a single file to "
            f"{SAFE}, or add the index of a sharded set)") if others else ""
    raise CheckpointError(f"{d}: no {SAFE}, {SAFE_INDEX}, {BIN} or {BIN_INDEX}{hint}")


def read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not a {tensor: file} object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid checkpoint index ({e})") from None
    for name in weight_map.values():
        if Path(name).name != name:
            raise CheckpointError(f"{path}: shard {name!r} is not a file name in the checkpoint directory")
    return weight_map


def deepspeed_zero_folder(d: Path) -> str | None:
    """What marks `d` as a DeepSpeed ZeRO checkpoint (or one of its global_stepN folders), else None."""
    states = sorted(d.glob("*model_states.pt")) or sorted(d.glob("global_step*/*model_states.pt"))
    if states:
        return str(states[0].relative_to(d))
    if (d / "zero_to_fp32.py").is_file():
        return "zero_to_fp32.py"
    return None
