"""Serving throughput and latency, measured side by side in one run.

    python bench/serve.py [--model small|tiny] [--requests 32] [--max-tokens 48] [--max-seq-len 512]
                          [--steps-per-call N]

Builds a random checkpoint (bench/common.py's config, the package's tiny tokenizer), starts
`python -m qwenvl_jax.serve` on it and sends the same greedy chat requests through the official
`openai` client at concurrency 1, 4 and 16 (streamed, so the time to the first token is seen).
Prints aggregate output tokens/s, time to first token p50/p99, the ratio of each to concurrency 1
and to the same requests run one by one through `generate` in this process; then the time to first
token of a short request on an idle server and while 15 long generations run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import CONFIGS


def build_checkpoint(model: str, out: Path) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenvl_jax.processing.tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config

    ids = make_tiny_tokenizer(out)
    write_preprocessor_config(out, min_pixels=3136, max_pixels=200_704)
    cfg = CONFIGS[model]("float32")
    cfg.text_config.vocab_size = ids["vocab_size"]
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(cfg, name, ids[name])
    Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(out)


def start_server(checkpoint: Path, max_batch: int, max_seq_len: int, steps_per_call: int | None
                 ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps = ["--steps-per-call", str(steps_per_call)] if steps_per_call else []
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl_jax.serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--max-batch", str(max_batch), "--max-seq-len", str(max_seq_len),
                             "--dtype", "float32", "--served-model-name", "bench", *steps],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "XLA_FLAGS": ""})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit(f"server did not start:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.5)


def prompts(n: int) -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven red birds sing in the tall green trees".split()
    return [" ".join(words[(i * 3) % len(words):] + words[: (i * 3) % len(words)])[: 20 + (i * 37) % 120]
            for i in range(n)]


def ask(client, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """-> (time to first token, total time, completion tokens) of one streamed greedy request."""
    t = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t
    return (first if first is not None else total), total, tokens


def run_level(client, texts, max_tokens, concurrency) -> dict:
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: ask(client, p, max_tokens), texts))
    wall = time.perf_counter() - t
    ttft = sorted(r[0] for r in results)
    return {"tokens_per_s": sum(r[2] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))], "wall": wall}


def generate_one_by_one(checkpoint: Path, texts, max_tokens) -> float:
    from qwenvl_jax.generation.decode import generate
    from qwenvl_jax.pretrained import load_pretrained
    from qwenvl_jax.processing.processor import Processor

    processor, model = Processor.from_pretrained(checkpoint), load_pretrained(checkpoint, dtype="float32")
    batches = [processor(text=processor.apply_chat_template([{"role": "user", "content": p}],
                                                            add_generation_prompt=True)) for p in texts]
    for b in batches[:3]:  # compile the buckets these prompts use
        generate(model, model.prepare(**b), max_new_tokens=max_tokens, eos_token_ids=processor.eos_token_ids,
                 pad_token_id=processor.pad_token_id)
    t, tokens = time.perf_counter(), 0
    for b in batches:
        out = generate(model, model.prepare(**b), max_new_tokens=max_tokens, eos_token_ids=processor.eos_token_ids,
                       pad_token_id=processor.pad_token_id)
        tokens += len(out.token_ids[0])
    return tokens / (time.perf_counter() - t)


def _long_generations(base: str, texts: list[str], stop) -> None:
    """The background load: one streamed 400-token generation after another per text, in a process
    of its own, so its client-side work does not hold the measuring process's GIL."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

    def loop(text):
        while not stop.is_set():
            ask(client, text, 400)

    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        list(pool.map(loop, texts))


def _busy_slots(base: str) -> int:
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        return json.load(r)["busy_slots"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-seq-len", type=int, default=512, help="the server's ring: prompt + max_tokens per request")
    ap.add_argument("--steps-per-call", type=int, help="the server's decode steps per call (default: its own)")
    args = ap.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        build_checkpoint(args.model, checkpoint)
        texts = prompts(args.requests)
        reference = generate_one_by_one(checkpoint, texts, args.max_tokens)
        proc, base = start_server(checkpoint, max_batch=16, max_seq_len=args.max_seq_len,
                                  steps_per_call=args.steps_per_call)
        try:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
            run_level(client, texts, args.max_tokens, 16)  # warm: every prompt bucket compiled
            levels = {c: run_level(client, texts, args.max_tokens, c) for c in (1, 4, 16)}
            idle = [ask(client, "hello there", 4)[0] for _ in range(9)]
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            load = ctx.Process(target=_long_generations, args=(base, texts[:15], stop))
            load.start()
            while _busy_slots(base) < 15:  # the 15 are decoding
                time.sleep(0.2)
            busy = [ask(client, "hello there", 4)[0] for _ in range(9)]
            stop.set()
            load.join()
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    print(f"model {args.model}; 16 slots of {args.max_seq_len}, {args.steps_per_call or 'default'} steps per call; "
          f"{args.requests} greedy requests of up to {args.max_tokens} tokens; "
          f"generate one by one: {reference:.1f} tok/s")
    print("| concurrency | output tok/s | vs concurrency 1 | vs generate one by one | TTFT p50 | TTFT p99 |")
    print("|---|---|---|---|---|---|")
    one = levels[1]["tokens_per_s"]
    for c, r in levels.items():
        rate = r["tokens_per_s"]
        print(f"| {c} | {rate:.1f} | {rate / one:.2f}x | {rate / reference:.2f}x "
              f"| {r['ttft_p50'] * 1000:.0f} ms | {r['ttft_p99'] * 1000:.0f} ms |")
    print(f"short request TTFT: idle {statistics.median(idle) * 1000:.0f} ms, beside 15 long generations "
          f"{statistics.median(busy) * 1000:.0f} ms ({statistics.median(busy) / statistics.median(idle):.2f}x)")


if __name__ == "__main__":
    main()
