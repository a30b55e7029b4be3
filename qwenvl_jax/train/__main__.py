"""python -m qwenvl_jax.train: train a Qwen2.5-VL stage from a YAML config.

    python -m qwenvl_jax.train --config configs/train/tiny.yaml
    python -m qwenvl_jax.train --config configs/train/sft.yaml model.init_from=Qwen2.5-VL-7B-Instruct \\
        data.path=train.jsonl output_dir=runs/sft train.steps=2000 checkpoint.every=200 \\
        mesh=data=1,fsdp=-1,tensor=4 --export-hf runs/sft/hf

Overrides are dotted KEY=VALUE pairs (values parsed as YAML). Progress goes to stderr, one JSON
line per step to output_dir/metrics.jsonl, the last step's line to stdout (nothing when a resumed
run had no step left); checkpoints to output_dir/checkpoints (a restarted run resumes from the
latest). Multi-host: the same command on every host, plus --distributed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from qwenvl_jax import compilation_cache, distributed
from qwenvl_jax.cli import DefaultsHelpFormatter, user_error


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--config", help="training YAML (configs/train/*.yaml; default: the built-in defaults, "
                                     "a tiny model on generated data)")
    ap.add_argument("--export-hf", metavar="DIR", help="write the final params as an HF checkpoint")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted config overrides, e.g. train.steps=100 data.path=train.jsonl data.root=/data/media")
    compilation_cache.add_argument(ap)
    distributed.add_arguments(ap)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        distributed.initialize_from_args(args)
        compilation_cache.enable_from_args(args)
        from qwenvl_jax.train.config import load_train_config
        from qwenvl_jax.train.loop import run

        cfg = load_train_config(args.config, args.overrides)
        if args.export_hf:
            cfg = dataclasses.replace(cfg, export_hf=args.export_hf)
        result = run(cfg)
    except (ValueError, OSError) as e:  # config / data / checkpoint errors: one line
        return user_error(e)
    if result and distributed.is_main_process():  # {}: no step ran (resumed at train.steps)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
