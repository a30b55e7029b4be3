"""python -m qwenvl_jax.data: run the data pipeline over a dataset and report what it produced.

    python -m qwenvl_jax.data --checkpoint DIR --data train.jsonl [--data-root DIR] --seq-len 8192 --stats

Tokenizer, chat template and image settings come from the checkpoint. Prints one JSON line:
samples (packed into batches), skipped (counts by reason), batches, rows, packing_efficiency (real
tokens / token budget of the rows), patch_efficiency, samples_per_s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from qwenvl_jax.cli import DefaultsHelpFormatter, user_error


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m qwenvl_jax.data", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint dir (tokenizer, template, processor config)")
    ap.add_argument("--data", required=True, help="JSONL or ArrayRecord file")
    ap.add_argument("--data-root", metavar="DIR",
                    help="directory relative image/video paths in --data resolve against (default: --data's directory)")
    ap.add_argument("--seq-len", type=int, default=8192, help="text tokens per packed row")
    ap.add_argument("--patch-budget", type=int, help="ViT patches per row (default: 2 x --seq-len)")
    ap.add_argument("--batch-size", type=int, default=1, help="rows per batch")
    ap.add_argument("--max-pixels", type=int, help="per-image pixel cap (default: the checkpoint's)")
    ap.add_argument("--packer", default="first_fit", choices=["first_fit", "best_fit"], help="packing algorithm")
    ap.add_argument("--workers", type=int, default=0, help="grain worker processes (0: read in this process)")
    ap.add_argument("--on-bad-sample", default="skip", choices=["skip", "raise"],
                    help="skip: count a bad sample and go on; raise: stop at the first")
    ap.add_argument("--stats", action="store_true", help="print the statistics line (the default action)")
    return ap.parse_args(argv)


def run(args) -> dict:
    from qwenvl_jax.config import Qwen25VLConfig
    from qwenvl_jax.data.pipeline import DataConfig, SampleEncoder, make_dataset, open_source, skip_report
    from qwenvl_jax.data.sources import resolve_data_root
    from qwenvl_jax.processing.processor import Processor

    config = Qwen25VLConfig.from_hf_file(args.checkpoint)
    processor = Processor.from_pretrained(args.checkpoint)
    data = DataConfig(seq_len=args.seq_len, patch_budget=args.patch_budget, batch_size=args.batch_size,
                      max_pixels=args.max_pixels, packer=args.packer, workers=args.workers,
                      on_bad_sample=args.on_bad_sample, shuffle=False)
    source = open_source(args.data)
    root = resolve_data_root(args.data, args.data_root)
    ds = make_dataset(source, SampleEncoder(processor, config, data, data_root=root), config, data)
    patches, _ = data.budgets(config.vision.window_patches)
    t = time.perf_counter()
    samples = batches = rows = tokens = used_patches = 0
    skipped = {}
    for batch in ds:
        batches += 1
        rows += len(batch["input_ids"])
        samples += int(batch["num_samples"].sum())
        tokens += int((batch["segment_ids"] > 0).sum())
        used_patches += int((batch["full_segment_ids"] > 0).sum())
        for reason, n in skip_report([batch]).items():
            skipped[reason] = skipped.get(reason, 0) + n
    elapsed = time.perf_counter() - t
    return {"samples": samples, "skipped": skipped, "batches": batches, "rows": rows,
            "packing_efficiency": round(tokens / max(rows * data.seq_len, 1), 4),
            "patch_efficiency": round(used_patches / max(rows * patches, 1), 4),
            "samples_per_s": round(samples / elapsed, 2) if elapsed > 0 else None, "records": len(source)}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, OSError) as e:  # user errors (bad paths, bad config, a fatal bad sample): one line
        return user_error(e)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
