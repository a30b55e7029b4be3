"""Deviceless TPU compiles (qwenvl_jax.aot): the real XLA:TPU and Mosaic compilers, run on this CPU
for 4-chip v5p and v5e topologies. A kernel that GSPMD cannot partition, a sharding that does not
fit, or a Pallas block shape Mosaic refuses fails here, without a TPU.

The model is the tiny preset with attention_impl "auto": compiling for a TPU mesh must pick the
Pallas kernels (not the interpreted or XLA path) although the default backend is the CPU.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from qwenvl_jax import aot
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.pipeline import DataConfig
from qwenvl_jax.kernels import sharded
from qwenvl_jax.sharding import Layout, MeshConfig, active

MESHES = ["tensor=4", "fsdp=2,tensor=2", "data=2,fsdp=2"]  # README's layouts on 4 chips
DATA = DataConfig(seq_len=256)


@pytest.fixture(scope="module")
def v5p():
    return aot.tpu_devices("v5p-8")


@pytest.fixture(scope="module")
def config():
    config = Qwen25VLConfig.from_preset("tiny")
    assert config.attention_impl == "auto"
    return config


def _layout(mesh, devices, config):
    return Layout.create(MeshConfig.parse(mesh), devices=devices).for_model(config)


@pytest.mark.parametrize("name, shape", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-32", "v5p:2x2x4"), ("v5p-64", "v5p:2x4x4"),
    ("v5p-128", "v5p:4x4x4"), ("v5p-512", "v5p:4x8x8"), ("v4-8", "v4:2x2x1"), ("v5litepod-1", "v5e:1x1"),
    ("v5e-4", "v5e:2x2"), ("v5litepod-8", "v5e:2x4"), ("v5e-16", "v5e:4x4"), ("v5e-32", "v5e:4x8"),
    ("v5e-256", "v5e:16x16"), ("v6e-8", "v6e:2x4")])
def test_slice_names_map_to_cloud_tpu_topologies(name, shape):
    """Cloud TPU's published slice shapes (v4/v5p names count TensorCores, 2 per chip)."""
    assert aot.topology_name(name) == shape


@pytest.mark.parametrize("bad", ["v9-8", "v5p", "v5p-3", "v5p-12", "v5e-0", "tpu-8"])
def test_bad_slice_names(bad):
    with pytest.raises(aot.TopologyError, match="TPU slice"):
        aot.topology_name(bad)


def test_devices_are_tpu_chips(v5p):
    assert len(v5p) == 4 and {d.platform for d in v5p} == {"tpu"}
    assert jax.default_backend() == "cpu"  # the process itself stays on the CPU
    assert len(aot.tpu_devices("v5e-4")) == 4


@pytest.mark.parametrize("mesh", ["tensor=4", "data=2,fsdp=2"])
def test_kernels_fwd_and_bwd_compile_per_shard(v5p, config, mesh):
    """Both kernels, forward + backward, on a mesh that splits their heads or rows: Mosaic calls in
    the compiled program (unpartitioned, this is 'Mosaic kernels cannot be automatically partitioned')."""
    layout = _layout(mesh, v5p, config)
    bf16 = jnp.bfloat16

    def arg(shape, names, dtype=bf16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=layout.sharding(names, shape))

    qkv = ("batch", "length", "heads", "head_dim")
    dec = (arg((4, 512, 8, 128), qkv), arg((4, 512, 2, 128), qkv), arg((4, 512, 2, 128), qkv),
           arg((4, 512), ("batch", "length"), jnp.int32))
    vqkv = ("batch", "length", "vision_heads", "head_dim")
    vis = (arg((4, 1024, 16, 80), vqkv),) * 3 + (arg((4, 1024), ("batch", "length"), jnp.int32),)

    def vision(q, k, v, seg):
        ranges = sharded.vision_segment_ranges(seg, 128)
        return sharded.vision_segment_attention(q, k, v, seg, max_segment_len=64, block=128, ranges=ranges)

    for fn, args in ((sharded.sharded_causal_attention, dec), (vision, vis)):
        def loss(q, k, v, seg, fn=fn):
            with active(layout):
                return jnp.sum(fn(q, k, v, seg).astype(jnp.float32))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        assert aot.summarize(compiled)["mosaic_kernels"] >= 3  # forward, and the backward's kernels


@pytest.fixture(scope="module", params=MESHES)
def v5p_programs(request, v5p, config):
    """Forward, SFT train step, prefill and decode compiled for one 4-chip v5p mesh."""
    layout = _layout(request.param, v5p, config)
    forward = aot.compile_forward(config, layout, batch=4, seq_len=256, image_tokens=64)
    train = aot.compile_train_step(config, layout, DATA, rows=4, stage="sft")
    prefill, decode = aot.compile_generation(config, layout, batch=4, prompt_len=128, max_new_tokens=32,
                                             image_tokens=16)
    serve_step = aot.compile_serving_step(config, layout, max_batch=4, max_seq_len=160)
    return layout, {c.name: c for c in (forward, train, prefill, decode, serve_step)}


def test_programs_compile_with_mosaic_kernels(v5p_programs):
    _, programs = v5p_programs
    kernels = {name: c.summary()["mosaic_kernels"] for name, c in programs.items()}
    # Forward and prefill: ViT window + full kernels and the decoder's splash (a prefill attends
    # among the prompt's tokens, not to the whole cache); the SFT step adds the decoder kernel's
    # backward; decode (one token against the cache) is XLA.
    assert kernels["forward"] >= 3
    assert kernels["prefill"] >= 3
    assert kernels["train_step[sft]"] > kernels["forward"]
    assert kernels["decode"] == 0


def test_decode_keeps_the_cache_in_its_declared_sharding(v5p_programs):
    """The decode loop carries each layer's cache in the sharding it is given and returns it in: no
    cache-sized all-gather at the loop's exit (XLA, left alone, split the cache over kv heads inside
    the loop whenever the kv heads did not divide the tensor axis, and gathered it back per call)."""
    _, programs = v5p_programs
    slots = 160  # bucket(prompt 128 + 32 new tokens), a size no other operand has
    gathered = [line for line in programs["decode"].compiled.as_text().splitlines()
                if "all-gather(" in line and re.search(rf"\[[0-9,]*\b{slots}\b[0-9,]*\]", line.split("all-gather(")[0])]
    assert not gathered, gathered[:2]


@pytest.mark.parametrize("program", ["decode", "serve_step"])
def test_decode_relays_nothing_per_call(v5p_programs, program):
    """generate's decode loop and the server's step take their weights and state in the layouts
    they use (placed there once; aot compiles them as generate and the engine do): the entry
    computation, run once per call (per token in the server), copies no array. Left to the default
    row-major layouts, it copied every layer's k and v cache into the loop's layout and back, the
    state's token and segment arrays, and on the 3B width ~70% of the decoder weights, per call."""
    _, programs = v5p_programs
    assert relaid_arguments(programs[program].compiled.as_text(), slots=160) == []


def test_the_serving_step_over_fewer_rows_relays_nothing(v5p, config):
    """While few slots are busy the engine runs the step over the first rows, with the params and
    state where the whole step placed them: that program copies no parameter or cache either (rows
    replicated over the mesh: tensor parallel), and needs no more scratch memory than the whole step."""
    layout = _layout("tensor=4", v5p, config)
    whole = aot.compile_serving_step(config, layout, max_batch=4, max_seq_len=160)
    one_row = aot.compile_serving_step(config, layout, max_batch=4, max_seq_len=160, rows=1)
    assert one_row.name == "serve_step[rows=1]"
    assert relaid_arguments(one_row.compiled.as_text(), slots=160) == []
    assert one_row.summary()["temp_bytes"] <= whole.summary()["temp_bytes"]


def relaid_arguments(hlo: str, slots: int) -> list[str]:
    """Copies and transposes (rank >= 2) in a program's entry computation of a parameter (by name,
    or an entry argument itself) or of a cache-sized array (one of its dimensions is the cache's
    slot count). Activations (a one-step call's body lies in the entry computation) are not counted."""
    start = hlo.index("\nENTRY")
    entry = hlo[start:hlo.index("\n}\n", start)]
    found = []
    for line in entry.splitlines():
        m = re.search(r"= \S+\[(\d+(?:,\d+)+)\]\S* (copy|transpose)\((\S+)\)", line)  # rank >= 2
        if m and ('op_name="params[' in line or m.group(3).startswith("%param")
                  or str(slots) in m.group(1).split(",")):
            found.append(line.strip()[:120])
    return found


def test_compiled_arguments_hold_the_sharded_state(v5p_programs, config):
    """XLA's argument bytes per chip cover the state and batch shards one chip holds (TPU tiling
    only pads small arrays up), and the donated state is updated in place."""
    layout, programs = v5p_programs
    summary = programs["train_step[sft]"].summary()
    _, _, state, shardings = aot.abstract_train_state(config, layout, "sft")

    def local_bytes(x, sharding):
        return jnp.dtype(x.dtype).itemsize * math.prod(sharding.shard_shape(x.shape))

    state_bytes = sum(map(local_bytes, jax.tree.leaves(state), jax.tree.leaves(shardings)))
    batch_bytes = sum(local_bytes(x, x.sharding) for x in aot.train_batch(config, layout, DATA, 4).values())
    assert summary["argument_bytes"] >= state_bytes + batch_bytes
    assert summary["alias_bytes"] >= state_bytes // 2  # params and optimizer moments alias their outputs


def test_stage1_vision_train_step_compiles(v5p, config):
    """Stage 1 (ViT + merger train): the ViT kernels' backward is compiled too."""
    layout = _layout("fsdp=2,tensor=2", v5p, config)
    vision = aot.compile_train_step(config, layout, DATA, rows=4, stage="vision").summary()
    assert vision["mosaic_kernels"] >= 6  # window + full, forward and two backward kernels each


def test_v5e_train_step_and_generation_compile(config):
    layout = _layout("data=2,tensor=2", aot.tpu_devices("v5e-4"), config)
    train = aot.compile_train_step(config, layout, DATA, rows=4, stage="all").summary()
    prefill, decode = aot.compile_generation(config, layout, batch=2, prompt_len=64, max_new_tokens=16,
                                             image_tokens=16)
    assert train["mosaic_kernels"] >= 6 and prefill.summary()["mosaic_kernels"] >= 3

