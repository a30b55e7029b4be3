"""Packing efficiency and loader throughput of the Grain pipeline.

    python bench/packing.py [--samples 4000] [--bins 16,64]

1. Efficiency (real tokens / token budget of the emitted rows) of grain's first-fit and best-fit
   packers at 8192 and 32768 tokens on a realistic mix: text lengths log-normal (median 600
   tokens), a third of the samples with 1-4 images of random sizes (224-1344 px sides, each
   adding its merged tokens and patches), packed exactly as the pipeline packs (text, patch, ViT
   slot and item budgets). Uses pre-encoded samples, so it measures the packer alone.
2. Throughput (samples/s) of the whole pipeline (JSONL -> chat template -> tokens -> images ->
   packed batches) with 0 and 2 grain worker processes, on a generated dataset with a tiny
   tokenizer (run from the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import grain
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from qwenvl_jax.config import Qwen25VLConfig  # noqa: E402
from qwenvl_jax.data.pipeline import DataConfig  # noqa: E402


def synthetic_samples(n: int, seed: int, cfg: Qwen25VLConfig, seq_len: int):
    """Feature-length-only samples with the pipeline's packed features."""
    rng = np.random.default_rng(seed)
    v = cfg.vision
    out = []
    for _ in range(n):
        text = int(np.clip(rng.lognormal(np.log(600), 1.0), 16, seq_len // 2))
        patches = slots = items = 0
        if rng.random() < 1 / 3:
            for _ in range(int(rng.integers(1, 5))):
                h, w = (int(x) // 28 * 28 for x in rng.integers(224, 1345, 2))
                gh, gw = h // 14, w // 14
                patches += gh * gw
                slots += -(-gh // 8) * -(-gw // 8) * v.window_patches
                items += 1
        tokens = text + patches // 4
        if tokens > seq_len:
            continue
        out.append({"input_ids": np.zeros(tokens, np.int32), "patches": np.zeros((patches, 1), np.uint8),
                    "grids": np.zeros((items, 3), np.int32), "slots": np.zeros(slots, np.int8)})
    return out


def efficiency(samples, seq_len: int, packer: str, bins: int, cfg: Qwen25VLConfig) -> dict:
    data = DataConfig(seq_len=seq_len)
    patches, slots = data.budgets(cfg.vision.window_patches)
    fits = [s for s in samples if len(s["patches"]) <= patches and len(s["slots"]) <= slots]
    cls = grain.experimental.FirstFitPackIterDataset if packer == "first_fit" else \
        grain.experimental.BestFitPackIterDataset
    ds = cls(grain.MapDataset.source(fits).to_iter_dataset(), num_packing_bins=bins, seed=0,
             length_struct={"input_ids": seq_len, "patches": patches, "grids": data.max_items, "slots": slots})
    rows = list(ds)
    # The packer's last, partly filled bins are flushed at the end of the data: a training run on
    # repeated data never sees them, so they are reported but not counted.
    steady = rows[:-bins] if len(rows) > 2 * bins else rows
    tokens = sum(int((r["input_ids_segment_ids"] > 0).sum()) for r in steady)
    patch_use = sum(int((r["patches_segment_ids"] > 0).sum()) for r in steady)
    return {"seq_len": seq_len, "packer": packer, "bins": bins, "rows": len(rows),
            "efficiency": round(tokens / (len(steady) * seq_len), 4),
            "patch_efficiency": round(patch_use / (len(steady) * patches), 4)}


def throughput(workers: int, records: int) -> float:
    from PIL import Image
    from tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config

    from qwenvl_jax.data.pipeline import SampleEncoder, make_dataset, open_source
    from qwenvl_jax.processing.processor import Processor

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ids = make_tiny_tokenizer(d)
        write_preprocessor_config(d, min_pixels=3136, max_pixels=200_000)
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (int(rng.integers(100, 500)), int(rng.integers(100, 500)), 3),
                                         dtype=np.uint8)).save(d / f"{i}.png")
        words = "the a cat dog sees runs over under big small red blue".split()
        with open(d / "train.jsonl", "w") as f:
            for i in range(records):
                q = " ".join(rng.choice(words, int(rng.integers(5, 60))))
                a = " ".join(rng.choice(words, int(rng.integers(5, 200))))
                rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                if i % 3 == 0:
                    rec["image"] = f"{i % 8}.png"
                    rec["conversations"][0]["value"] = "<image>\n" + q
                f.write(json.dumps(rec) + "\n")
        tiny = Qwen25VLConfig.from_preset("tiny").to_hf_dict()
        tiny.update({k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")})
        cfg = Qwen25VLConfig.from_hf_dict(tiny)
        data = DataConfig(seq_len=2048, batch_size=4, shuffle=False, workers=workers)
        encoder = SampleEncoder(Processor.from_pretrained(d), cfg, data, data_root=d)
        ds = make_dataset(open_source(d / "train.jsonl"), encoder, cfg, data)
        t = time.perf_counter()
        n = sum(int(b["num_samples"].sum()) for b in ds)
        return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--bins", default="16,64")
    ap.add_argument("--records", type=int, default=400)
    args = ap.parse_args()
    cfg = Qwen25VLConfig.from_preset("7b")
    results = {"efficiency": [], "throughput": {}}
    for seq_len in (8192, 32768):
        samples = synthetic_samples(args.samples * seq_len // 8192, 0, cfg, seq_len)
        for packer in ("first_fit", "best_fit"):
            for bins in (int(b) for b in args.bins.split(",")):
                r = efficiency(samples, seq_len, packer, bins, cfg)
                results["efficiency"].append(r)
                print(f"seq {seq_len:6d} {packer:9s} bins {bins:3d}: token efficiency {r['efficiency']:.1%}, "
                      f"patch budget use {r['patch_efficiency']:.1%} ({r['rows']} rows)")
    for workers in (0, 2):
        results["throughput"][f"workers_{workers}"] = round(throughput(workers, args.records), 1)
        print(f"pipeline throughput, {workers} workers: {results['throughput'][f'workers_{workers}']} samples/s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
