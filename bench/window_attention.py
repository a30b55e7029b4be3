"""ViT windowed attention: FLOPs and time of the windowed paths vs dense masked attention.

    python bench/window_attention.py [--sizes 1024,4096,16384] [--heads 16] [--head-dim 80]

Real ViT shapes (16 heads of 80, 64-patch windows = 8x8 patches). For each sequence length:
useful FLOPs of windowed attention (linear in N) vs dense attention (quadratic), and the time of
  * xla-windowed: model/attention.attend with aligned 64-row windows (block-diagonal),
  * xla-dense:    the same attention as one [N, N] masked softmax (skipped when its scores would
                  not fit in memory),
  * pallas:       the Pallas kernel, on a TPU only (interpret mode on CPU measures nothing useful).
Ratios are measured side by side in one run; the "growth" column is time / time at the previous
size divided by the size ratio: about 1 means linear.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from common import timed

from qwenvl_jax.kernels.window_attention import flops, segment_attention
from qwenvl_jax.model.attention import attend

WINDOW = 64
MAX_DENSE_BYTES = 4 * 2**30


def paths(n, heads, head_dim, on_tpu):
    seg = jnp.asarray(np.repeat(np.arange(1, n // WINDOW + 1), WINDOW).astype(np.int32))[None]
    out = {
        "xla-windowed": jax.jit(lambda q, k, v: attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=False,
                                                        max_segment_len=WINDOW, aligned=True)),
    }
    if heads * n * n * 4 <= MAX_DENSE_BYTES:
        out["xla-dense"] = jax.jit(lambda q, k, v: attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                           causal=False))
    if on_tpu:
        def kernel(q, k, v):
            t = lambda x: x[0].transpose(1, 0, 2)  # noqa: E731  [1, N, H, D] -> [H, N, D]
            return segment_attention(t(q), t(k), t(v), seg[0], max_segment_len=WINDOW).transpose(1, 0, 2)[None]
        out["pallas"] = jax.jit(kernel)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096,16384")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    on_tpu = jax.default_backend() == "tpu"
    dtype = jnp.bfloat16 if on_tpu else jnp.float32
    rng = np.random.default_rng(0)
    results, previous = [], {}
    print(f"backend {jax.default_backend()}, {dtype.__name__}, {args.heads} heads x {args.head_dim}, "
          f"windows of {WINDOW}")
    for n in (int(x) for x in args.sizes.split(",")):
        q, k, v = (jnp.asarray(rng.standard_normal((1, n, args.heads, args.head_dim)), dtype) for _ in range(3))
        row = {"patches": n, "gflops_windowed": flops(args.heads, args.head_dim, [WINDOW] * (n // WINDOW)) / 1e9,
               "gflops_dense": flops(args.heads, args.head_dim, [n]) / 1e9}
        for name, fn in paths(n, args.heads, args.head_dim, on_tpu).items():
            jax.block_until_ready(fn(q, k, v))  # compile
            t = min(timed(lambda: jax.block_until_ready(fn(q, k, v)), args.runs))
            row[f"{name}_ms"] = round(t * 1e3, 2)
            if name in previous:
                row[f"{name}_growth"] = round(t / previous[name][1] / (n / previous[name][0]), 2)
            previous[name] = (n, t)
        if "xla-dense_ms" in row:
            row["dense_over_windowed"] = round(row["xla-dense_ms"] / row["xla-windowed_ms"], 2)
        if "pallas_ms" in row:
            row["xla_over_pallas"] = round(row["xla-windowed_ms"] / row["pallas_ms"], 2)
        results.append(row)
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if not on_tpu:
        print("pallas kernel: not timed (no TPU; interpret mode is a correctness tool, not a speed one)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
