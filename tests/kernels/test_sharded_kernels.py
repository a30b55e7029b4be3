"""The Pallas kernels under shard_map (kernels/sharded.py) on 8 CPU devices, interpreted: forward and
gradients equal the same kernels on one device (1e-5), for meshes that split rows and heads, with
kv heads that do not divide over `tensor`; and the interpret decision follows the mesh's platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwenvl_jax import aot
from qwenvl_jax.kernels import sharded
from qwenvl_jax.kernels.causal_attention import causal_attention
from qwenvl_jax.kernels.window_attention import segment_attention
from qwenvl_jax.sharding import Layout, MeshConfig, active

# Heads over tensor=4 (the decoder's 2 kv heads repeated), mixed rows and heads, rows only.
MESHES = ["data=2,fsdp=1,tensor=4", "data=2,fsdp=2,tensor=2", "data=1,fsdp=8,tensor=1"]


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _layout(mesh: str) -> Layout:
    return Layout.create(MeshConfig.parse(mesh))


def _run(layout, fn, args, names):
    """fn(*args) and the gradients of sum(out**2), jitted with args placed by logical `names`."""
    placed = [layout.put(np.asarray(a), n) for a, n in zip(args, names)]

    def loss(*xs):
        with active(layout):
            out = fn(*xs)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*placed)
    return out, grads


def _decoder_case():
    rng = np.random.default_rng(0)
    b, length, h, kv, d = 4, 200, 8, 2, 128  # 2 kv heads on tensor=4: the repeat path
    q = rng.standard_normal((b, length, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, length, kv, d)).astype(np.float32) for _ in range(2))
    seg = np.stack([np.repeat([1, 2, 3], [50, 120, 30]), np.r_[np.zeros(20), np.ones(180)],
                    np.ones(200), np.repeat([1, 2], [199, 1])]).astype(np.int32)
    return q, k, v, seg


@pytest.fixture(scope="module")
def decoder_reference():
    q, k, v, seg = _decoder_case()
    return _run(Layout.create(), lambda q, k, v, s: causal_attention(q, k, v, s, interpret=True),
                (q, k, v, seg), [None] * 4)


@pytest.mark.parametrize("mesh", MESHES)
def test_decoder_kernel_per_shard_equals_one_device(mesh, decoder_reference):
    q, k, v, seg = _decoder_case()
    layout = _layout(mesh)
    names = [("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim"),
             ("batch", "length", "kv_heads", "head_dim"), ("batch", "length")]
    out, grads = _run(layout, sharded.sharded_causal_attention, (q, k, v, seg), names)
    assert len(out.sharding.device_set) == 8
    ref_out, ref_grads = decoder_reference
    real = seg > 0
    assert _rel(np.asarray(out)[real], np.asarray(ref_out)[real]) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-5


def _vision_case():
    """3 rows of 2 x 64-slot windows plus a 100-slot group (the full-attention case), padding inside."""
    rng = np.random.default_rng(1)
    r, s, h, d = 4, 320, 4, 80
    seg = np.zeros((r, s), np.int32)
    for i in range(r):
        n = [64, 40, 64, 100, 0][i % 5]
        seg[i, :64], seg[i, 64:64 + n], seg[i, 128:228] = 1, 2, 3
    seg[3] = 0  # an empty row: all padding
    q, k, v = (rng.standard_normal((r, s, h, d)).astype(np.float32) for _ in range(3))
    return q, k, v, seg


def _vision(q, k, v, seg):
    ranges = sharded.vision_segment_ranges(seg, 128)
    return sharded.vision_segment_attention(q, k, v, seg, max_segment_len=100, block=128, ranges=ranges)


@pytest.fixture(scope="module")
def vision_reference():
    """One device: the plain kernel, one row at a time."""
    q, k, v, seg = _vision_case()

    def rows(q, k, v, s):
        t = lambda x: x.transpose(1, 0, 2)  # noqa: E731
        return jnp.stack([t(segment_attention(t(q[i]), t(k[i]), t(v[i]), s[i], max_segment_len=100, interpret=True))
                          for i in range(q.shape[0])])

    return _run(Layout.create(), rows, (q, k, v, seg), [None] * 4)


@pytest.mark.parametrize("mesh", MESHES)
def test_vision_kernel_per_shard_equals_one_device(mesh, vision_reference):
    q, k, v, seg = _vision_case()
    layout = _layout(mesh)
    qkv = ("batch", "length", "vision_heads", "head_dim")
    out, grads = _run(layout, _vision, (q, k, v, seg), [qkv, qkv, qkv, ("batch", "length")])
    ref_out, ref_grads = vision_reference
    assert _rel(out, ref_out) <= 1e-5
    assert np.all(np.asarray(out)[seg == 0] == 0)
    for g, r in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-5


def test_kernel_calls_are_partitioned_per_shard():
    """Under a mesh the kernel runs inside shard_map on the local block (rows / data, heads / tensor)."""
    q, k, v, seg = _decoder_case()
    layout = _layout("data=2,fsdp=1,tensor=4")

    def fn(q, k, v, s):
        with active(layout):
            return sharded.sharded_causal_attention(q, k, v, s)

    jaxpr = str(jax.make_jaxpr(fn)(q, k, v, seg))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    spec = layout.spec(("batch", "length", "heads", "head_dim"), q.shape)
    assert spec == P("data", None, "tensor", None)


def test_interpret_follows_the_mesh_platform():
    """A CPU mesh interprets; a TPU mesh (deviceless topology) lowers Mosaic even though the
    default backend is the CPU."""
    assert not sharded.interpret_kernels() or jax.default_backend() != "tpu"
    with active(_layout("data=1,fsdp=8,tensor=1")):
        assert sharded.interpret_kernels() and sharded.resolve_impl("auto") == "xla"
    tpu = aot.tpu_devices("v5p-8")
    with active(Layout.create(MeshConfig.parse("fsdp=4"), devices=tpu)):
        assert not sharded.interpret_kernels() and sharded.resolve_impl("auto") == "pallas"
