"""A small generated dataset and tokenizer, so `configs/train/tiny.yaml` runs with nothing downloaded.

Pictures of a few colored squares on a plain background with questions whose answers the image
decides ("How many squares are there?" -> "3", "What color are the squares?" -> "red"), plus a
few text-only turns. Deterministic for a seed; written once into a directory that then holds
the JSONL, the images, and a tiny Qwen-style tokenizer + chat template + processor config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qwenvl_jax.processing.tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
NUMBERS = ["one", "two", "three", "four"]


def _picture(rng, count: int, color: str, size: int = 112) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    side = size // 6
    cells = rng.permutation(16)[:count]
    for c in cells:
        x, y = (c % 4) * (size // 4) + 4, (c // 4) * (size // 4) + 4
        draw.rectangle([x, y, x + side, y + side], fill=COLORS[color])
    return img


def write_synthetic_dataset(out_dir: str | Path, samples: int = 64, seed: int = 0) -> Path:
    """Writes (once) out_dir/train.jsonl, its images and a tiny tokenizer; returns out_dir."""
    out = Path(out_dir)
    if (out / "train.jsonl").is_file() and (out / "tokenizer.json").is_file():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(out)
    write_preprocessor_config(out, min_pixels=3136, max_pixels=112 * 112)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(samples):
        if i % 8 == 7:
            lines.append({"messages": [{"role": "user", "content": "Say hello."},
                                       {"role": "assistant", "content": "Hello!"}]})
            continue
        count, color = int(rng.integers(1, 5)), str(rng.choice(list(COLORS)))
        name = f"images/{i:04d}.png"
        _picture(rng, count, color).save(out / name)
        if i % 2:
            q, a = "How many squares are there?", NUMBERS[count - 1]
        else:
            q, a = "What color are the squares?", color
        lines.append({"image": name, "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                       {"from": "gpt", "value": a}]})
    tmp = out / "train.jsonl.tmp"
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(out / "train.jsonl")
    return out
