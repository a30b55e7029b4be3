"""Random damage to every file a user hands us: images, videos, safetensors headers, config.json.
Each mutation ends in success or the component's one documented error (never another exception),
within a time limit, and the process's peak memory grows by less than MEMORY_BOUND."""

import json
import random
import resource
import struct
import time

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.config import ConfigError, Qwen25VLConfig
from qwenvl_jax.processing.image import ImageLoadError, load_image
from qwenvl_jax.processing.video_io import VideoLoadError, read_video
from qwenvl_jax.weights.load import CheckpointError, CheckpointTensors

MEMORY_BOUND = 512 * 2**20  # bytes of peak-RSS growth over all mutations of one kind
N = 150


def _mutations(data: bytes, seed: int, n: int = N):
    """Byte flips, cuts, insertions and repeated runs (the kinds of damage a disk or a copy does)."""
    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            op, at = rng.random(), rng.randrange(len(b))
            if op < 0.4:
                b[at] = rng.randrange(256)
            elif op < 0.6:
                del b[at:at + rng.randint(1, 64)]
            elif op < 0.8:
                b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            else:
                b = b[:at]
            if not b:
                b = bytearray(b"\0")
        yield bytes(b)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run(items, call, allowed, seconds=60):
    before, t0, outcomes = _peak_rss(), time.perf_counter(), {"ok": 0, "error": 0}
    for item in items:
        try:
            call(item)
            outcomes["ok"] += 1
        except allowed:
            outcomes["error"] += 1
    assert time.perf_counter() - t0 < seconds
    assert _peak_rss() - before < MEMORY_BOUND
    assert outcomes["error"] > 0  # the mutations did damage
    return outcomes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_damaged_images(tmp_path, fmt):
    rng = np.random.default_rng(0)
    src = tmp_path / f"ok.{fmt.lower()}"
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(src, fmt)
    path = tmp_path / f"bad.{fmt.lower()}"

    def call(data):
        path.write_bytes(data)
        load_image(path)

    _run(_mutations(src.read_bytes(), seed=1), call, ImageLoadError)


def test_damaged_videos(tmp_path):
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(6)]
    src = tmp_path / "ok.gif"
    frames[0].save(src, save_all=True, append_images=frames[1:], duration=250, loop=0)
    path = tmp_path / "bad.gif"

    def call(data):
        path.write_bytes(data)
        read_video(path)

    _run(_mutations(src.read_bytes(), seed=2, n=80), call, VideoLoadError)


def test_damaged_safetensors_headers(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones((4, 8), np.float32), "b": np.zeros((3,), np.float32)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, body = data[8:8 + n], data[8 + n:]
    d = tmp_path / "ckpt"
    d.mkdir()

    def call(new_header):
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(new_header)) + new_header + body)
        tensors = CheckpointTensors(d)
        for key in tensors.keys():
            tensors.get(key)

    def length_lies(h):  # a header length field that lies
        return struct.pack("<Q", random.Random(len(h)).choice([0, 7, 2**63, len(data) * 4])) + h + body

    _run(_mutations(header, seed=3), call, CheckpointError)
    _run([length_lies(header)] * 3, lambda raw: ((d / "model.safetensors").write_bytes(raw), CheckpointTensors(d)),
         CheckpointError)


def test_damaged_config_json(tmp_path):
    from hf_reference import hf_config

    hf_config("tied_w56").save_pretrained(tmp_path / "ok")
    text = (tmp_path / "ok" / "config.json").read_bytes()
    rng = random.Random(4)
    cfg = json.loads(text)
    variants = list(_mutations(text, seed=4))
    for _ in range(N):  # valid JSON, wrong values: a random key of a random section set to a random value
        section = rng.choice([cfg, cfg["text_config"], cfg["vision_config"]])
        key = rng.choice(sorted(section))
        value = rng.choice([None, "x", -1, 0, 1.5, 1e300, [], {}, [1, 2], True])
        bad = json.loads(text)
        target = bad if section is cfg else bad["text_config" if section is cfg["text_config"] else "vision_config"]
        target[key] = value
        variants.append(json.dumps(bad).encode())
    path = tmp_path / "config.json"

    def call(data):
        path.write_bytes(data)
        Qwen25VLConfig.from_hf_file(path)

    _run(variants, call, ConfigError)
