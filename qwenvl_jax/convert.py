"""python -m qwenvl_jax.convert: re-write an HF Qwen2.5-VL checkpoint through qwenvl_jax.

    python -m qwenvl_jax.convert --checkpoint IN_DIR|HUB_ID --out OUT_DIR [--adapter LORA_DIR|HUB_ID]
        [--dtype bfloat16|float16|float32] [--max-shard-size-gb 5] [--revision REV]

Loads the checkpoint (safetensors or PyTorch .bin, with a PEFT LoRA adapter merged in if given)
into our param tree, checking every tensor's name and shape, then writes it back as HF safetensors
(sharded, with index and config.json) in the chosen dtype; tokenizer, processor and generation
files are copied alongside. The same functions are the library API:
`load_pretrained(path, adapter=...)` and `model.save_pretrained(out, dtype=...)` (which copies
those files from the directory the model was loaded from).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from qwenvl_jax.cli import DefaultsHelpFormatter
from qwenvl_jax.config import ConfigError
from qwenvl_jax.pretrained import checkpoint_dtype, load_pretrained
from qwenvl_jax.weights import hub
from qwenvl_jax.weights.load import CheckpointError


def output_problem(out: Path, max_shard_size_gb: float) -> str | None:
    """What makes the output unusable, checked before the (long) load: None when fine."""
    if not (math.isfinite(max_shard_size_gb) and max_shard_size_gb > 0):
        return f"--max-shard-size-gb must be a positive number, got {max_shard_size_gb}"
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a directory"
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        return f"--out {out}: cannot write into {existing}"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="HF checkpoint to read: a directory (safetensors or PyTorch .bin) or a hub id (org/name)")
    ap.add_argument("--adapter", help="PEFT LoRA adapter (directory or hub id) to merge into the written weights")
    ap.add_argument("--revision", help="hub revision (branch, tag or commit) of a --checkpoint hub id")
    ap.add_argument("--adapter-revision", help="hub revision of an --adapter hub id")
    ap.add_argument("--out", required=True, help="directory to write the HF checkpoint to")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="dtype of the written tensors (default: the checkpoint's own torch_dtype)")
    ap.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    args = ap.parse_args(argv)
    out = Path(args.out)
    problem = output_problem(out, args.max_shard_size_gb)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        src = hub.resolve(args.checkpoint, args.revision)
        if out.resolve() == src.resolve():
            print("error: --out must differ from --checkpoint (the source is never overwritten)", file=sys.stderr)
            return 2
        dtype = args.dtype or checkpoint_dtype(src)
        # loaded in the output dtype: one copy, no upcast (an adapter is merged in float32 per slice first)
        model = load_pretrained(src, dtype=dtype, adapter=args.adapter, adapter_revision=args.adapter_revision)
        # weights, config.json, and src's tokenizer / processor / generation files
        model.save_pretrained(out, dtype=dtype, max_shard_bytes=int(args.max_shard_size_gb * 2**30))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
