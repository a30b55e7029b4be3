"""python -m qwenvl_jax.convert: re-write an HF Qwen2.5-VL checkpoint through qwenvl_jax.

    python -m qwenvl_jax.convert --checkpoint IN_DIR --out OUT_DIR [--dtype bfloat16|float16|float32]
        [--max-shard-size-gb 5]

Loads the safetensors checkpoint into our param tree (checking every tensor's name and shape),
then writes it back as HF safetensors (sharded, with index and config.json) in the chosen dtype;
tokenizer, processor and generation files are copied alongside. The same functions are the
library API: `load_pretrained(path)` and `model.save_pretrained(out, dtype=...)` (which copies
those files from the directory the model was loaded from).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwenvl_jax.cli import DefaultsHelpFormatter
from qwenvl_jax.config import ConfigError
from qwenvl_jax.pretrained import load_pretrained
from qwenvl_jax.weights.load import CheckpointError


def _checkpoint_dtype(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "float32"  # load_pretrained reports the unreadable config itself
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("dtype")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "float32"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.convert", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint directory to read")
    ap.add_argument("--out", required=True, help="directory to write the HF checkpoint to")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="dtype of the written tensors (default: the checkpoint's own torch_dtype)")
    ap.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors shard, in GiB")
    args = ap.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    if out.resolve() == src.resolve():
        print("error: --out must differ from --checkpoint (the source is never overwritten)", file=sys.stderr)
        return 2
    try:
        dtype = args.dtype or _checkpoint_dtype(src)
        model = load_pretrained(src, dtype=dtype)  # loaded in the output dtype: one copy, no upcast
        # weights, config.json, and src's tokenizer / processor / generation files
        model.save_pretrained(out, dtype=dtype, max_shard_bytes=int(args.max_shard_size_gb * 2**30))
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
