"""The Pallas segment-attention kernel against the XLA reference (model/attention.attend).

Forward and all three gradients on a seeded sweep of shapes in interpret mode; a few cases under
the TPU simulator (random order of parallel grid axes, 2 cores, race detection, out-of-bounds
reads raise); and lowering for TPU via jax.export, which checks block shapes and ops on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from qwenvl_jax.kernels.window_attention import block_ranges, max_steps, segment_attention
from qwenvl_jax.model.attention import attend


def reference(q, k, v, seg):
    """XLA attention over [H, S, D] with padding rows (segment 0) zeroed, computed in f32."""
    t = lambda x: x.astype(jnp.float32).transpose(1, 0, 2)[None]  # noqa: E731
    out = attend(t(q), t(k), t(v), q_segment_ids=seg[None], kv_segment_ids=seg[None], causal=False)[0]
    return jnp.where((seg > 0)[:, None, None], out, 0.0).transpose(1, 0, 2)


def window_segments(rng, num_windows: int, window: int, partial: bool, pad_tail: int, holes: bool):
    """Segment ids like the ViT's slot layout: windows of `window` rows, some partial (their tail
    is padding, id 0), padding at the end; or, with holes, padding rows inside windows."""
    ids = []
    for w in range(num_windows):
        n = int(rng.integers(1, window + 1)) if partial and rng.random() < 0.5 else window
        ids += [w + 1] * n + [0] * (window - n)
    ids = np.array(ids + [0] * pad_tail, np.int32)
    if holes:
        ids[rng.random(ids.shape[0]) < 0.05] = 0
    return ids


def _case(seed):
    """Shape sweep: head dims 16/64/80/128, 1-16 heads, window counts, partial windows, f32/bf16."""
    rng = np.random.default_rng(seed)
    d = [16, 64, 80, 128][seed % 4]
    h = [1, 2, 3, 16][(seed // 4) % 4] if d <= 80 else [1, 2][seed % 2]
    window = [16, 64, 100, 160][(seed // 2) % 4]
    num = int(rng.integers(1, 7))
    seg = window_segments(rng, num, window, partial=seed % 3 != 0, pad_tail=int(rng.integers(0, 40)),
                          holes=seed % 5 == 0)
    dtype = jnp.bfloat16 if seed % 2 else jnp.float32
    return rng, h, d, window, seg, dtype


def _inputs(rng, h, s, d, dtype):
    return [jnp.asarray(rng.standard_normal((h, s, d)), dtype) for _ in range(3)]


def _rel(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


@pytest.mark.parametrize("seed", range(20))
def test_kernel_matches_reference(seed):
    rng, h, d, window, seg_np, dtype = _case(seed)
    s = seg_np.shape[0]
    q, k, v = _inputs(rng, h, s, d, dtype)
    seg = jnp.asarray(seg_np)
    do = jnp.asarray(rng.standard_normal((h, s, d)), jnp.float32) * (seg > 0)[None, :, None]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2

    def kernel(q, k, v):
        return segment_attention(q, k, v, seg, max_segment_len=window, interpret=True)

    out, vjp = jax.vjp(kernel, q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: reference(q, k, v, seg), q, k, v)
    assert out.dtype == dtype and out.shape == (h, s, d)
    assert _rel(out, ref) <= tol, ("forward", seed, _rel(out, ref))
    assert np.all(np.asarray(out)[:, seg_np == 0] == 0)
    grads = vjp(do.astype(dtype))
    ref_grads = ref_vjp(do)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        assert _rel(g, r) <= tol, (f"d{name}", seed, _rel(g, r))


def test_full_attention_segments_without_bound():
    """Long segments (whole frames of the full-attention blocks), no static bound given."""
    rng = np.random.default_rng(7)
    seg = jnp.asarray(np.repeat([1, 2, 3], [300, 500, 137]).astype(np.int32))
    q, k, v = _inputs(rng, 2, seg.shape[0], 80, jnp.float32)
    out = segment_attention(q, k, v, seg, interpret=True)
    assert _rel(out, reference(q, k, v, seg)) <= 1e-5


def test_block_ranges_cover_exactly_the_interacting_blocks():
    rng = np.random.default_rng(3)
    seg = window_segments(rng, 9, 100, partial=True, pad_tail=124, holes=True)
    block = 128
    start, count = (np.asarray(x) for x in block_ranges(jnp.asarray(seg), block))
    nb = seg.shape[0] // block
    for i in range(nb):
        rows = seg[i * block:(i + 1) * block]
        needed = {j for j in range(nb) for r in set(rows[rows > 0]) if np.any(seg[j * block:(j + 1) * block] == r)}
        got = set(range(start[i], start[i] + count[i]))
        assert needed <= got and (not needed or got == set(range(min(needed), max(needed) + 1)))
        assert count[i] <= max_steps(nb, block, 100)
    # 64-row windows in 128-row blocks: each block reaches only itself; the grid allows 3 steps.
    aligned = np.repeat(np.arange(1, 17), 64).astype(np.int32)
    start, count = block_ranges(jnp.asarray(aligned), 128)
    assert np.all(np.asarray(count) == 1) and np.all(np.asarray(start) == np.arange(8))
    assert max_steps(8, 128, 64) == 3


@pytest.mark.parametrize("seed", [1, 2])
def test_tpu_simulator(seed):
    """Parallel grid axes visited in random order over 2 simulated cores, with race detection and
    out-of-bounds reads raising: catches what plain interpret mode cannot."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as simulator

    rng = np.random.default_rng(seed)
    seg = jnp.asarray(window_segments(rng, 5, 64, partial=True, pad_tail=30, holes=False))
    q, k, v = _inputs(rng, 2, seg.shape[0], 64, jnp.float32)
    params = pltpu.InterpretParams(random_seed=seed, num_cores_or_threads=2, detect_races=True,
                                   out_of_bounds_reads="raise")

    def loss(q, k, v, interpret):
        return jnp.sum(segment_attention(q, k, v, seg, max_segment_len=64, interpret=interpret) ** 2)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, params)
    assert not simulator.races.races_found
    ref_value, ref_grads = jax.value_and_grad(lambda q, k, v: jnp.sum(reference(q, k, v, seg) ** 2),
                                              argnums=(0, 1, 2))(q, k, v)
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_for_tpu(dtype):
    """jax.export for platform 'tpu' runs the Pallas TPU lowering on CPU: illegal block shapes or
    unsupported ops fail here. Real ViT shapes: 16 heads of 80, 64-patch windows."""
    h, s, d = 16, 2048, 80
    x = jax.ShapeDtypeStruct((h, s, d), dtype)
    seg = jax.ShapeDtypeStruct((s,), jnp.int32)

    def fwd(q, k, v, seg):
        return segment_attention(q, k, v, seg, max_segment_len=64)

    def bwd(q, k, v, seg):
        return jax.grad(lambda q, k, v: fwd(q, k, v, seg).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    for fn, kernels in ((fwd, 1), (bwd, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(x, x, x, seg)
        assert exported.platforms == ("tpu",)
        assert exported.mlir_module().count("tpu_custom_call") == kernels


def test_bad_arguments():
    q = jnp.zeros((2, 128, 16))
    with pytest.raises(ValueError, match="multiple of 128"):
        segment_attention(q, q, q, jnp.ones(128, jnp.int32), block=100)
    with pytest.raises(ValueError, match="segment_ids"):
        segment_attention(q, q, q, jnp.ones(127, jnp.int32))


def test_decoder_splash_attention_lowers_for_tpu_and_matches():
    """The decoder's causal attention (splash, GQA 4:1, packed segments, length not a multiple of
    the block): equal to the XLA path in interpret mode, and lowers for TPU."""
    from qwenvl_jax.kernels.causal_attention import causal_attention

    rng = np.random.default_rng(0)
    b, length, h, kv, d = 2, 200, 8, 2, 128
    q = jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, length, kv, d)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [50, 120, 30]), np.r_[np.zeros(20), np.ones(180)]]), jnp.int32)
    got = causal_attention(q, k, v, seg, interpret=True)
    want = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True)
    real = np.asarray(seg) > 0
    assert _rel(got[real], want[real]) <= 1e-5
    spec = [jax.ShapeDtypeStruct(x.shape, jnp.bfloat16) for x in (q, k, v)]
    spec.append(jax.ShapeDtypeStruct(seg.shape, jnp.int32))
    exported = jax.export.export(jax.jit(causal_attention), platforms=["tpu"])(*spec)
    assert exported.mlir_module().count("tpu_custom_call") >= 1
