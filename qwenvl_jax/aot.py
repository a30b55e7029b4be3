"""Ahead-of-time compiles for a TPU slice, on any machine: the real XLA:TPU and Mosaic compilers,
no TPU needed (`jax[tpu]` installs libtpu, which compiles for a topology it is only told about).

    devices = tpu_devices("v5p-8")                       # 4 v5p chips, deviceless
    layout = Layout.create("fsdp=2,tensor=2", devices=devices).for_model(config)
    compiled = compile_train_step(config, layout, DataConfig(seq_len=8192), rows=4)
    summarize(compiled)   # per-chip memory, FLOPs, bytes, Mosaic kernel calls

Everything is abstract (`jax.ShapeDtypeStruct` with the layout's `NamedSharding`s): parameters,
optimizer state, batches, KV cache; nothing is allocated. The functions compiled are the ones a run
executes: `train.step.train_step`, `generation.decode`'s prefill and decode steps, the model forward.
With `JAX_PLATFORMS=cpu` the rest of the process still runs on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.buckets import bucket
from qwenvl_jax.compiled import auto_formats, placement, shape_spec
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.data.pipeline import DataConfig
from qwenvl_jax.model.vision_layout import VisionInputs
from qwenvl_jax.sharding import Layout, param_shardings

# Chip-level topology per TPU family: v4 / v5p are 3D tori with two TensorCores per chip (slice
# names count cores), v5e / v6e 2D with one.
FAMILIES = {"v4": (3, 2, "megacore"), "v5p": (3, 2, "megacore"), "v5e": (2, 1, None), "v6e": (2, 1, None)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}
MOSAIC_CALL = 'custom_call_target="tpu_custom_call"'


class TopologyError(ValueError):
    """A TPU slice name this module cannot describe."""


def topology_name(tpu: str) -> str:
    """'v5p-8' -> 'v5p:2x2x1' (4 chips), 'v5p-64' -> 'v5p:2x4x4', 'v5e-8' -> 'v5e:2x4': dimensions
    fill to 2 in order, then the last of the smallest doubles, as Cloud TPU shapes its slices."""
    family, _, count = tpu.lower().partition("-")
    family = ALIASES.get(family, family)
    if family not in FAMILIES or not count.isdigit():
        raise TopologyError(f"TPU slice {tpu!r}: expected FAMILY-CORES with FAMILY in {sorted(FAMILIES)}, "
                            "e.g. v5p-8 (4 chips) or v5e-4")
    ndim, cores_per_chip, _ = FAMILIES[family]
    cores = int(count)
    chips = cores // cores_per_chip
    if chips < 1 or cores % cores_per_chip or chips & (chips - 1):
        raise TopologyError(f"TPU slice {tpu!r}: {family} slices have a power-of-two number of chips, "
                            f"{cores_per_chip} core(s) each")
    dims = [1] * ndim
    while math.prod(dims) < chips:
        smallest = min(dims)
        ties = [j for j, d in enumerate(dims) if d == smallest]
        i = ties[0] if smallest == 1 else ties[-1]
        dims[i] *= 2
    return f"{family}:{'x'.join(map(str, dims))}"


def tpu_devices(tpu: str) -> list:
    """The chips of a TPU slice as devices to compile for (no TPU needed; libtpu must be installed).

    When this is the first use of libtpu in the process, it is told there is no local TPU to
    look for (no metadata-server queries, no warnings) and not to take libtpu's one-process lock,
    which would stop a second deviceless compile (a test and a `plan --compile` subprocess) while
    opening no chip. Call it before any real TPU use in the same process, or not at all there.
    """
    name = topology_name(tpu)
    for key, value in (("TPU_ACCELERATOR_TYPE", tpu), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    chip_config = FAMILIES[name.split(":")[0]][2]
    kw = {"chip_config_name": chip_config} if chip_config else {}
    dims = [int(d) for d in name.split(":")[1].split("x")] + [1]
    hosts = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))  # up to 4 chips per host, as on the VMs
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, num_slices=1,
                                            chips_per_host_bounds=hosts, wrap=(False,) * 3, **kw)
    except ImportError as e:
        raise TopologyError(f"cannot compile for {tpu}: {e}; install the 'tpu' extra (pip install "
                            "'qwenvl_jax[tpu]', which brings libtpu)") from None
    except RuntimeError as e:  # libtpu missing or refusing the topology
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "; install the 'tpu' extra (libtpu)" if "libtpu" in first.lower() and "lock" not in first else ""
        raise TopologyError(f"cannot describe {tpu} ({name}): {first}{hint}") from None
    return list(topo.devices)


# --------------------------------------------------------------------------------- abstract values
def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(config: Qwen25VLConfig, layout: Layout, param_dtype, dtype=None):
    """(graphdef, parameters as a pure dict of sharded ShapeDtypeStructs)."""
    from qwenvl_jax.weights.load import abstract_model

    graphdef, state = abstract_model(config, param_dtype, dtype)
    return graphdef, shape_spec(nnx.to_pure_dict(state), nnx.to_pure_dict(param_shardings(state, layout)))


def abstract_train_state(config: Qwen25VLConfig, layout: Layout, stage: str = "sft", param_dtype=jnp.float32,
                         dtype=jnp.bfloat16):
    """(graphdef, optimizer, abstract TrainState with its shardings attached, the state's shardings)
    as `python -m qwenvl_jax.train` builds them for `stage` (AdamW over its trainable groups)."""
    from qwenvl_jax.train import step as steplib
    from qwenvl_jax.train.config import STAGES, OptimSpec

    graphdef, params = abstract_params(config, layout, param_dtype, dtype)
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx, _ = steplib.make_optimizer(OptimSpec(), 1000, plain, STAGES[stage])
    state = jax.eval_shape(lambda p: steplib.init_state(p, tx), plain)
    shardings = steplib.state_shardings(state, jax.tree.map(lambda x: x.sharding, params), tx, layout)
    return graphdef, tx, shape_spec(state, shardings), shardings


def abstract_vision(config: Qwen25VLConfig, layout: Layout, rows: int, patches: int, slots: int,
                    max_full_len: int, pixel_dtype) -> VisionInputs:
    """VisionInputs of `rows` rows at fixed patch / slot budgets (as the data pipeline pads them)."""
    v = config.vision
    mu = v.merge_unit

    def put(shape, dtype):
        return _abstract(shape, dtype, layout.sharding(("batch",) + (None,) * (len(shape) - 1), shape))

    return VisionInputs(pixel_values=put((rows, patches, v.patch_dim), pixel_dtype),
                        unit_index=put((rows, slots // mu), jnp.int32),
                        reverse_index=put((rows, patches // mu), jnp.int32),
                        rotary_pos=put((rows, slots, 2), jnp.int32),
                        window_segment_ids=put((rows, slots), jnp.int32),
                        full_segment_ids=put((rows, slots), jnp.int32),
                        window_len=v.window_patches, max_full_len=max_full_len)


def vision_budgets(config: Qwen25VLConfig, image_tokens: int) -> tuple[int, int]:
    """(patches, slots) for `image_tokens` merged tokens, padded as DataConfig.budgets pads."""
    if image_tokens <= 0:
        return 0, 0
    return DataConfig(seq_len=1, patch_budget=image_tokens * config.vision.merge_unit).budgets(
        config.vision.window_patches)


# ------------------------------------------------------------------------------------------ compiles
@dataclasses.dataclass
class Compiled:
    """A compiled program and what compiling it took."""
    name: str
    compiled: object  # jax.stages.Compiled
    compile_s: float

    def summary(self) -> dict:
        return summarize(self.compiled) | {"name": self.name, "compile_s": round(self.compile_s, 2)}


def _compile(name: str, jitted, *args) -> Compiled:
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return Compiled(name, compiled, time.perf_counter() - t)


def summarize(compiled) -> dict:
    """Per-chip memory from XLA's buffer assignment, its cost analysis, and the Mosaic kernel
    calls in the optimized program. XLA counts a scanned (while-loop) body once: `flops` and
    `bytes_accessed` are per loop trip for the layer stacks, so compare FLOPs analytically."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    text = compiled.as_text()
    return {
        "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes), "alias_bytes": int(mem.alias_size_in_bytes),
        "generated_code_bytes": int(mem.generated_code_size_in_bytes),
        "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                          - mem.alias_size_in_bytes),
        "xla_flops": float(cost.get("flops", 0.0)), "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "mosaic_kernels": text.count(MOSAIC_CALL),
    }


def compile_forward(config: Qwen25VLConfig, layout: Layout, *, batch: int, seq_len: int, image_tokens: int = 0,
                    dtype=jnp.bfloat16) -> Compiled:
    """The logits forward (`PretrainedModel.forward`) of `batch` rows of `seq_len` tokens, each row
    with `image_tokens` image tokens (one vision row per batch row)."""
    from qwenvl_jax.pretrained import BATCH, POSITIONS, _jit_forward, _shardings_key

    graphdef, params = abstract_params(config, layout, dtype, dtype)
    ids = _abstract((batch, seq_len), jnp.int32, layout.sharding(BATCH, (batch, seq_len)))
    pos = _abstract((3, batch, seq_len), jnp.int32, layout.sharding(POSITIONS, (3, batch, seq_len)))
    vision = index = None
    if image_tokens:
        patches, slots = vision_budgets(config, image_tokens)
        vision = abstract_vision(config, layout, batch, patches, slots, slots, jnp.float32)
        index = ids
    args = (params, ids, pos, ids, vision, index)
    out = layout.sharding(("batch", "length", "vocab"), (batch, seq_len, config.text.vocab_size))
    in_shardings = jax.tree.map(lambda x: x.sharding, args)
    return _compile("forward", _jit_forward(graphdef, layout, _shardings_key(in_shardings), out), *args)


def train_batch(config: Qwen25VLConfig, layout: Layout, data: DataConfig, rows: int, accum: int = 1) -> dict:
    """An abstract train batch [accum, rows, ...] at the data config's budgets (what
    data.pipeline.make_dataset yields, stacked as the train loop stacks it)."""
    from qwenvl_jax.train.step import batch_shardings

    length = data.seq_len
    patches, slots = data.budgets(config.vision.window_patches)
    mu = config.vision.merge_unit
    shapes = {"input_ids": ((length,), jnp.int32), "segment_ids": ((length,), jnp.int32),
              "position_ids": ((3, length), jnp.int32), "labels": ((length,), jnp.int32),
              "vision_token_index": ((length,), jnp.int32),
              "pixel_values": ((patches, config.vision.patch_dim), jnp.uint8),
              "unit_index": ((slots // mu,), jnp.int32), "reverse_index": ((patches // mu,), jnp.int32),
              "rotary_pos": ((slots, 2), jnp.int32), "window_segment_ids": ((slots,), jnp.int32),
              "full_segment_ids": ((slots,), jnp.int32)}
    plain = {k: jax.ShapeDtypeStruct((accum, rows, *s), d) for k, (s, d) in shapes.items()}
    shardings = batch_shardings(plain, layout)
    return {k: _abstract(v.shape, v.dtype, shardings[k]) for k, v in plain.items()}


def compile_train_step(config: Qwen25VLConfig, layout: Layout, data: DataConfig, *, rows: int, accum: int = 1,
                       stage: str = "sft", remat: str = "full", param_dtype=jnp.float32,
                       dtype=jnp.bfloat16, loss_chunk: int = 2048) -> Compiled:
    """The train step of `python -m qwenvl_jax.train` (AdamW, the stage's trainable groups, state
    donated) for `rows` packed rows of data.seq_len tokens per microbatch."""
    from qwenvl_jax.train import step as steplib
    from qwenvl_jax.train.config import STAGES

    graphdef, tx, state, state_sharding = abstract_train_state(config, layout, stage, param_dtype, dtype)
    cfg = steplib.StepConfig(groups=STAGES[stage], remat=remat, window_len=config.vision.window_patches,
                             max_full_len=data.item_slots(config.vision.window_patches), max_bad_steps=1,
                             loss_chunk=loss_chunk)
    batch = train_batch(config, layout, data, rows, accum)
    t = time.perf_counter()
    compiled, _ = steplib.compile_step(state, batch, graphdef=graphdef, tx=tx, layout=layout, cfg=cfg,
                                       state_sharding=state_sharding)
    return Compiled(f"train_step[{stage}]", compiled, time.perf_counter() - t)


def _generation_args(config, layout, batch, prompt_len, image_tokens):
    from qwenvl_jax.generation.sampling import SamplingParams

    rows = ("batch", "length")
    ids = _abstract((batch, prompt_len), jnp.int32, layout.sharding(rows, (batch, prompt_len)))
    pos = _abstract((3, batch, prompt_len), jnp.int32, layout.sharding((None, *rows), (3, batch, prompt_len)))
    vision = index = None
    if image_tokens:  # inference: one vision row holding every image of the batch, replicated
        patches, slots = vision_budgets(config, image_tokens * batch)
        vision = abstract_vision(config, layout, 1, patches, slots, slots, jnp.float32)
        index = ids
    rep = layout.replicated
    sampling = {k: _abstract(np.shape(v), np.asarray(v).dtype, rep) for k, v in SamplingParams().as_arrays().items()}
    eos = _abstract((1,), jnp.int32, rep)
    return ids, pos, vision, index, sampling, eos, _abstract((), jnp.int32, rep), _abstract((), jnp.uint32, rep)


def compile_generation(config: Qwen25VLConfig, layout: Layout, *, batch: int, prompt_len: int, max_new_tokens: int,
                       image_tokens: int = 0, dtype=jnp.bfloat16) -> tuple[Compiled, Compiled]:
    """`generate`'s two programs as it compiles them: the on-device decode loop first, with the
    layouts of the params and the state left to XLA, then the prefill of `prompt_len`-token prompts
    (vision tower inside) reading the params in the layouts the loop chose and writing the KV
    cache of prompt + max_new_tokens slots in the layouts the loop reads."""
    from qwenvl_jax.generation import decode as gen

    graphdef, params = abstract_params(config, layout, dtype, dtype)
    ids, pos, vision, index, sampling, eos, pad, seed = _generation_args(config, layout, batch, prompt_len,
                                                                         image_tokens)
    slots = bucket(prompt_len + max_new_tokens)
    shardings = gen._state_shardings(layout, config.text, batch, slots, max_new_tokens)
    static = (graphdef, layout, slots, max_new_tokens)
    prefill_args = (params, None, ids, pos, ids, vision, index, seed, sampling, eos, pad)  # None: layers sliced inside
    state = shape_spec(jax.eval_shape(lambda *d: gen._prefill(*static, *d), *prefill_args), shardings)
    n = _abstract((), jnp.int32, layout.replicated)
    dynamic = (params, None, state, n, sampling, eos, pad)
    in_shardings = (auto_formats(jax.tree.map(lambda x: x.sharding, params)), None,
                    auto_formats(shardings), *(jax.tree.map(lambda x: x.sharding, a) for a in dynamic[3:]))
    decode = jax.jit(gen._decode, **gen.DECODE_ARGNUMS, in_shardings=in_shardings,
                     out_shardings=auto_formats(shardings))
    compiled_decode = _compile("decode", decode, graphdef, layout, *dynamic)
    params_formats, _, state_formats = compiled_decode.compiled.input_formats[0][:3]
    prefill_args = (shape_spec(params, params_formats), *prefill_args[1:])
    prefill = jax.jit(gen._prefill, **gen.PREFILL_ARGNUMS,
                      in_shardings=(params_formats, *(jax.tree.map(lambda x: x.sharding, a) for a in prefill_args[1:])),
                      out_shardings=placement(state_formats, state))
    return _compile("prefill", prefill, *static, *prefill_args), compiled_decode


def compile_serving_step(config: Qwen25VLConfig, layout: Layout, *, max_batch: int, max_seq_len: int,
                         steps_per_call: int = 1, dtype=jnp.bfloat16, rows: int | None = None) -> Compiled:
    """The server's decode step (serve/engine.py) as the engine compiles it: every slot one token
    further over a ring of `max_seq_len` cache slots, with the layouts of the params and the slot
    state left to XLA (the engine places both there once). rows: the step over the first `rows`
    slots instead, taking the params and state in the layouts the whole step chose (as the engine
    runs it while few slots are busy)."""
    from qwenvl_jax.serve import engine

    graphdef, params = abstract_params(config, layout, dtype, dtype)
    shardings = engine._state_shardings(layout, config.text, max_batch, max_seq_len)
    empty = jax.eval_shape(lambda: engine._empty_state(config.text, max_batch, max_seq_len, dtype))
    state = shape_spec(empty, shardings)
    in_shardings = (auto_formats(jax.tree.map(lambda x: x.sharding, params)), None, auto_formats(shardings))
    step = jax.jit(engine._step, **engine.STEP_ARGNUMS, in_shardings=in_shardings,
                   out_shardings=(auto_formats(shardings), layout.replicated))
    whole = _compile("serve_step", step, graphdef, layout, steps_per_call, max_batch, params, None, state)
    if rows is None:
        return whole
    params_formats, _, state_formats = whole.compiled.input_formats[0]
    state_formats = placement(state_formats, state)
    step = jax.jit(engine._step, **engine.STEP_ARGNUMS,
                   in_shardings=(params_formats, None, state_formats), out_shardings=(state_formats, layout.replicated))
    return _compile(f"serve_step[rows={rows}]", step, graphdef, layout, steps_per_call, rows, params, None, state)
