"""python -m qwenvl_jax.serve on two processes (2 CPU devices each, one mesh of 4, joined by
jax.distributed on 127.0.0.1 with gloo): process 0 serves HTTP, process 1 runs the same steps.
Concurrent requests (text and an image, different lengths) each get generate's greedy answer from
a single process; stopping process 0 releases process 1, which exits cleanly."""

import base64
import concurrent.futures
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from qwenvl_jax.generation.decode import generate  # noqa: E402
from qwenvl_jax.pretrained import load_pretrained  # noqa: E402
from qwenvl_jax.processing.processor import Processor  # noqa: E402

TIMEOUT_S = 300
MAX_TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests():
    """(OpenAI content, template content, images) per request."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    out = []
    for i, words in enumerate(["Hello", "Tell me about the sea and the sky", "What is it?"]):
        text = {"type": "text", "text": words}
        if i == 2:
            out.append(([{"type": "image_url", "image_url": {"url": url}}, text], [{"type": "image"}, text],
                        [Image.open(io.BytesIO(png.getvalue()))]))
        else:
            out.append(([text], [text], []))
    return out


def test_two_processes_serve_as_one(chat_checkpoint, tmp_path):
    path = chat_checkpoint[0]
    processor, model = Processor.from_pretrained(path), load_pretrained(path, dtype="float32")
    expected = []
    for _, parts, images in _requests():
        prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
        batch = processor(text=prompt, images=images or None)
        ids = generate(model, model.prepare(**batch), max_new_tokens=MAX_TOKENS, eos_token_ids=processor.eos_token_ids,
                       pad_token_id=processor.pad_token_id).token_ids[0]
        expected.append(processor.decode(ids))

    coordinator, http = _free_port(), _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "qwenvl_jax.serve", "--checkpoint", str(path), "--port", str(http),
               "--max-batch", "2", "--max-seq-len", "256", "--dtype", "float32", "--served-model-name", "tiny",
               "--warm-up-prompt-tokens", "32",
               "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id", str(i)]
        with open(logs[i], "w") as err:
            procs.append(subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, env=env))
    try:
        base = f"http://127.0.0.1:{http}"
        deadline = time.time() + TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                pass
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                pytest.fail("servers did not start:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
            time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(content):
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                               max_tokens=MAX_TOKENS, temperature=0)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # 3 requests, 2 slots: one waits, then joins
            answers = list(pool.map(ask, [content for content, _, _ in _requests()]))
        assert answers == expected

        procs[0].send_signal(signal.SIGINT)  # process 0 shuts down and releases process 1
        for p in procs:
            p.wait(timeout=60)
        assert [p.returncode for p in procs] == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
