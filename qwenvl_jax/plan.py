"""python -m qwenvl_jax.plan: per-chip HBM estimate for training or serving Qwen2.5-VL on a TPU mesh.

    python -m qwenvl_jax.plan --model 72b --mesh fsdp=64,tensor=4 --seq-len 32768 --batch 64 --tpu v5p
    python -m qwenvl_jax.plan --model 7b --mesh fsdp=2,tensor=4 --seq-len 8192 --tpu v5e --mode infer
    python -m qwenvl_jax.plan --model 7b --mesh fsdp=-1,tensor=4 --tpu v5p-64 --batch 8 --json  # 32 chips
    python -m qwenvl_jax.plan --model 7b --mesh fsdp=2,tensor=4 --tpu v5p-16 --batch 4 --compile  # + XLA's numbers

Prints bytes per chip for params, optimizer state, gradients and activations (train), or params,
KV cache and activations (infer), and whether the total fits the TPU's HBM per chip.
Nothing is allocated and no devices are needed: parameter shapes come from `nnx.eval_shape`
(weights.load.abstract_model), optimizer state shapes from `jax.eval_shape(optax.adamw(...).init)`,
and every array is placed with the real `sharding.Layout` rules over a `jax.sharding.AbstractMesh`,
so the per-chip shard of each array is exactly the one a real run would hold (a dimension is split
only where the rules split it; head axes that do not divide over `tensor` are replicated).

Params, optimizer state, gradients and KV cache are exact. Activations are an ESTIMATE under these
assumptions (`ASSUMPTIONS`, also printed):
  train  f32 master params, f32 AdamW mu/nu and f32 gradients, all sharded like the params, and
         the update's temporaries (clipped gradients and updates: two more f32 copies); compute
         and activations in --dtype. Per-layer full rematerialisation: only each decoder layer's
         input [B_local, L, D] is kept across layers (likewise each vision block's input), and one
         layer's working set lives at a time: its forward intermediates (normed inputs, q/k/v,
         attention output, projections, the MLP's gate/up/act) plus as many bytes again for their
         gradients, plus that layer's weights and weight-gradients all-gathered over fsdp. Attention
         is a flash/splash kernel (no [L, L] scores; --attention dense adds them). The loss
         materialises f32 logits [B_local, L, vocab/tensor] and their gradient (--loss-chunk T:
         T tokens at a time, default 2048 as train.loss_chunk). XLA converts every layer's f32
         master weights to the compute dtype at once: one compute-dtype copy of the params. Peak =
         saved inputs + that copy + the largest phase (decoder layer / logits / vision block): the
         phases run one after another.
  infer  params and KV cache in --dtype; the KV cache has --seq-len slots (prompt + generated);
         the peak is the prefill of --seq-len tokens through one layer at a time (forward only),
         plus f32 logits of the last position.
  vision --image-tokens of each sample's --seq-len are image tokens (default 25%), each from
         spatial_merge_size**2 = 4 patches; the ViT runs on 1.5 x as many slots (each window
         padded to 64 patches, the data pipeline's default slot budget). Inference replicates the
         vision inputs of the whole batch on every chip (pretrained.put_vision); training assumes
         the train step shards them over the batch axes like the text.
XLA temporaries, fragmentation, collectives' buffers and the runtime's reserve are not modelled:
leave headroom (the fit line flags totals above 90% of HBM).

--compile (needs the `tpu` extra, no TPU) also compiles the real program for the slice: the train
step of `python -m qwenvl_jax.train` (stage "all", full remat, the same loss chunk), or generate's
prefill (prompts of seq-len - 128 tokens) and decode loop, and prints XLA's per-chip memory per
program (arguments, outputs, temporaries, aliased, peak), its Mosaic kernel calls and compile time,
the analytic FLOPs of one step and a lower bound on its HBM traffic (the state read and written
once; for decode, the weights and the cache read once), and from the chip's peak FLOP/s and HBM
bandwidth the step-time lower bound and the MFU ceiling it implies.
Bad input: one `error: ...` line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh

from qwenvl_jax.cli import DefaultsHelpFormatter, user_error
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.sharding import DEFAULT_RULES, MESH_AXES, Layout, MeshConfig, MeshError, spec_axes

GIB = 2**30
# HBM per chip. Google's pages say "GB"; these are the sizes the runtime reports per chip (v5p: 95).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}
# Slice names count TensorCores: v4-8 and v5p-8 are 4 chips (2 cores each), v5litepod-8 is 8 chips.
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
TIGHT = 0.9  # above this fraction of HBM the fit line warns: unmodelled temporaries may not fit
INFER_NEW_TOKENS = 128  # --compile --mode infer: prompts of seq-len - 128 tokens, 128 generated

HIDDEN = ("batch", "length", "act_embed")  # decoder.HIDDEN: residual stream, replicated over tensor
ASSUMPTIONS = {
    "train": [
        "estimate: params f32 master, AdamW mu/nu f32, gradients f32, all sharded like the params",
        "the optimizer update's temporaries: clipped gradients and updates, two more f32 param copies",
        "activations in the compute dtype; per-layer full remat: only each layer's input is saved",
        "one layer's working set at a time: forward intermediates + as much again for their "
        "gradients + its weights and weight-gradients all-gathered over fsdp",
        "attention: flash/splash kernel, no [L, L] scores (unless --attention dense)",
        "loss: f32 logits [B_local, L or --loss-chunk, vocab/tensor] and their gradient",
        "vision: image patches sharded over the batch axes like the text (train step's job); the ViT "
        "runs on slots, 1.5 x the patches (windows padded to 64), as the data pipeline budgets them",
        "a compute-dtype copy of every weight: XLA converts the stacked f32 master weights once, "
        "outside the layer loop (seen in the compiled buffer assignment)",
        "peak = saved layer inputs + compute-dtype weights + the largest of the phases "
        "(decoder layer / logits / vision)",
        "not modelled: XLA temporaries, fragmentation, collective buffers, runtime reserve",
    ],
    "infer": [
        "estimate: params and KV cache in --dtype; KV cache holds --seq-len slots",
        "activations: prefill of --seq-len tokens one layer at a time (forward only), flash attention "
        "(unless --attention dense), f32 logits of the last position",
        "vision: inputs of the whole batch replicated on every chip (as pretrained.put_vision does)",
        "not modelled: XLA temporaries, fragmentation, collective buffers, runtime reserve",
    ],
}


class PlanError(ValueError):
    """Bad planner input; the message is printed as one `error:` line."""


# --------------------------------------------------------------------------------------- sharding
def abstract_layout(config: Qwen25VLConfig, sizes: dict[str, int], rules=DEFAULT_RULES) -> Layout:
    """The model's Layout over a device-less mesh: Layout.spec only reads mesh axis sizes, so
    specs for 256 chips come out on a 1-CPU machine exactly as they would on the slice."""
    return Layout(AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES), rules).for_model(config)


def local_shape(layout: Layout, names, shape, gathered: tuple[str, ...] = ()) -> tuple[int, ...]:
    """Per-chip shard shape of an array with logical axes `names`; mesh axes in `gathered`
    count as all-gathered (an FSDP weight while its layer runs)."""
    spec = tuple(layout.spec(names, shape)) + (None,) * len(shape)
    out = []
    for dim, entry in zip(shape, spec):
        axes = spec_axes(entry)
        out.append(dim // math.prod(layout.mesh.shape[a] for a in axes if a not in gathered))
    return tuple(out)


def local_bytes(layout: Layout, names, shape, itemsize: int, gathered: tuple[str, ...] = ()) -> int:
    return math.prod(local_shape(layout, names, shape, gathered)) * itemsize


# ----------------------------------------------------------------------------------------- params
@dataclasses.dataclass(frozen=True)
class Param:
    path: str  # dotted, e.g. language_model.layers.mlp.gate_proj.kernel
    shape: tuple[int, ...]
    axes: tuple[str, ...]


def model_params(config: Qwen25VLConfig) -> list[Param]:
    """Every parameter's path, shape and logical axes, from nnx.eval_shape (nothing allocated)."""
    from qwenvl_jax.weights.load import abstract_model

    _, state = abstract_model(config)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return [Param(_dotted(path), tuple(var.get_value().shape), tuple(var.get_metadata()["axes"]))
            for path, var in flat]


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_bytes(params: list[Param], layout: Layout, itemsize: int) -> dict[str, int]:
    """path -> bytes of that parameter's shard on one chip."""
    return {p.path: local_bytes(layout, p.axes, p.shape, itemsize) for p in params}


def adamw_state_bytes(params: list[Param], layout: Layout) -> int:
    """Per-chip bytes of optax.adamw's state for f32 params: shapes from jax.eval_shape; every leaf
    that mirrors a parameter (mu, nu) is sharded like it, the rest (step counts) is replicated."""
    by_path = {p.path: p for p in params}
    abstract = {p.path: jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params}
    state = jax.eval_shape(optax.adamw(1e-4).init, abstract)
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        param = next((by_path[k.key] for k in path if isinstance(k, jax.tree_util.DictKey)
                      and k.key in by_path), None)
        itemsize = np.dtype(leaf.dtype).itemsize
        total += (local_bytes(layout, param.axes, param.shape, itemsize) if param
                  else math.prod(leaf.shape) * itemsize)
    return total


def gathered_weight_bytes(params: list[Param], layout: Layout, itemsize: int, select) -> int:
    """Bytes of ONE layer of the stacked params picked by `select(path)` (or of the non-stacked
    ones), with fsdp all-gathered: what the layer holds while it runs."""
    total = 0
    for p in params:
        if select(p.path):
            n = local_bytes(layout, p.axes, p.shape, itemsize, gathered=("fsdp",))
            total += n // p.shape[0] if p.axes[0] == "layers" else n
    return total


# ------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class Request:
    model: str
    mesh: str
    seq_len: int
    batch: int = 1
    tpu: str = "v5p"
    mode: str = "train"
    dtype: str = "bfloat16"
    devices: int | None = None
    image_tokens: int | None = None  # default: seq_len // 4
    loss_chunk: int = 2048  # train.loss_chunk's default; 0: the whole sequence's logits at once
    attention: str = "flash"
    compile: bool = False  # also compile the real program for the slice (deviceless) and report XLA's numbers


def parse_tpu(text: str) -> tuple[str, int | None]:
    """'v5p' -> ('v5p', None); a slice name 'v5p-64' -> ('v5p', 32 chips): v4/v5p count cores."""
    name, _, count = text.lower().partition("-")
    kind = TPU_ALIASES.get(name, name)
    if kind not in HBM_GIB or (count and not count.isdigit()):
        raise PlanError(f"unknown --tpu {text!r} (expected one of {', '.join(sorted(HBM_GIB))} or a slice "
                        "name like v5p-64, v5litepod-8)")
    if not count:
        return kind, None
    cores, per_chip = int(count), CORES_PER_CHIP[kind]
    if cores <= 0 or cores % per_chip:
        raise PlanError(f"--tpu {text}: {kind} slice sizes count TensorCores, {per_chip} per chip")
    return kind, cores // per_chip


def resolve_mesh(text: str, devices: int | None, slice_chips: int | None = None,
                 tpu: str = "") -> dict[str, int]:
    """Mesh sizes. A -1 axis takes the rest of --devices (or of the slice's chips); without either it
    is an error. Explicit sizes must multiply to --devices / the slice's chips when those are given."""
    mc = MeshConfig.parse(text)
    if devices is not None and slice_chips is not None and devices != slice_chips:
        raise PlanError(f"--devices {devices} contradicts --tpu {tpu} = {slice_chips} chips")
    source = (f" (--devices {devices})" if devices is not None
              else f" (--tpu {tpu} = {slice_chips} chips)" if slice_chips is not None else "")
    devices = slice_chips if devices is None else devices
    if devices is None:
        free = [a for a in MESH_AXES if getattr(mc, a) == -1]
        if free:
            raise PlanError(f"mesh {mc}: axis {free[0]!r} is -1 (or not given); pass --devices N, a "
                            "slice name like --tpu v5p-64, or every size explicitly")
        devices = math.prod(max(getattr(mc, a), 1) for a in MESH_AXES)
    if devices <= 0:
        raise PlanError(f"--devices must be positive, got {devices}")
    try:
        return mc.resolve(devices)
    except MeshError as e:
        raise PlanError(f"{e}{source}") from None


def plan(req: Request) -> dict:
    """The estimate as a dict (what --json prints): bytes per chip by component, plus context."""
    if req.mode not in ASSUMPTIONS:
        raise PlanError(f"--mode must be train or infer, got {req.mode!r}")
    tpu, slice_chips = parse_tpu(req.tpu)
    if req.dtype not in DTYPES:
        raise PlanError(f"--dtype must be one of {sorted(DTYPES)}, got {req.dtype!r}")
    for name, value in (("--seq-len", req.seq_len), ("--batch", req.batch)):
        if value <= 0:
            raise PlanError(f"{name} must be positive, got {value}")
    image_tokens = req.seq_len // 4 if req.image_tokens is None else req.image_tokens
    if not 0 <= image_tokens <= req.seq_len:
        raise PlanError(f"--image-tokens must be in [0, seq-len={req.seq_len}], got {image_tokens}")
    if req.loss_chunk < 0:
        raise PlanError(f"--loss-chunk must be >= 0, got {req.loss_chunk}")
    if req.attention not in ("flash", "dense"):
        raise PlanError(f"--attention must be flash or dense, got {req.attention!r}")
    config = Qwen25VLConfig.from_preset(req.model)
    sizes = resolve_mesh(req.mesh, req.devices, slice_chips, req.tpu)
    chips = math.prod(sizes.values())
    batch_shards = sizes["data"] * sizes["fsdp"]
    if req.mode == "train" and req.batch % batch_shards:
        raise PlanError(f"--batch {req.batch} is not divisible by data*fsdp = {batch_shards}: every "
                        "data-parallel shard needs whole samples")
    layout = abstract_layout(config, sizes)
    params = model_params(config)
    a = DTYPES[req.dtype]

    if req.mode == "train":
        pbytes = sum(param_bytes(params, layout, 4).values())
        # The update's temporaries: the clipped gradients and the updates, f32 like the params. From
        # the compiled 3B step: its temporaries grow by 2.7 f32 param copies from the gradient
        # program to the whole step (gradients included); with these two, the 7B plans come
        # within 2-7% of the compiled peaks (docs/tpu_compile.md).
        components = {"params": pbytes, "optimizer": adamw_state_bytes(params, layout), "gradients": pbytes,
                      "update_temporaries": 2 * pbytes}
        acts = _train_activations(config, layout, params, req, image_tokens, a)
    else:
        t = config.text
        kv_shape = (t.num_hidden_layers, req.batch, req.seq_len, t.num_key_value_heads, t.head_dim)
        kv_names = ("layers", "batch", "length", "kv_heads", "head_dim")  # generation.decode's layout
        components = {"params": sum(param_bytes(params, layout, a).values()),
                      "kv_cache": 2 * local_bytes(layout, kv_names, kv_shape, a)}
        acts = _infer_activations(config, layout, params, req, image_tokens, a)
    components["activations"] = acts.pop("total")
    total = sum(components.values())
    hbm = HBM_GIB[tpu] * GIB
    return {
        "model": req.model, "mode": req.mode, "tpu": tpu, "chips": chips, "mesh": sizes,
        "seq_len": req.seq_len, "batch": req.batch,
        "batch_per_shard": local_shape(layout, ("batch",), (req.batch,))[0],
        "image_tokens": image_tokens, "dtype": req.dtype, "attention": req.attention,
        "loss_chunk": req.loss_chunk, "num_params": sum(math.prod(p.shape) for p in params),
        "bytes_per_chip": components, "activation_breakdown": acts, "total_bytes_per_chip": total,
        "hbm_bytes_per_chip": hbm, "fraction_of_hbm": total / hbm, "fits": total <= hbm,
        "estimate": True, "assumptions": ASSUMPTIONS[req.mode],
        **({"compiled": compiled_report(req, config, sizes, tpu, image_tokens, total)} if req.compile else {}),
    }


# --------------------------------------------------------------------------------- deviceless compile
def compiled_report(req: Request, config: Qwen25VLConfig, sizes: dict[str, int], tpu: str, image_tokens: int,
                    estimate: int) -> dict:
    """Compiles the real program(s) for the slice without a TPU (qwenvl_jax.aot) and reports XLA's
    per-chip memory, the Mosaic kernel calls, analytic FLOPs and the step-time lower bound."""
    from qwenvl_jax import aot
    from qwenvl_jax.flops import CHIP_PEAKS, text_forward_flops_per_token, train_flops_per_token, vision_flops_per_patch
    from qwenvl_jax.pretrained import resolve_dtype

    chips = math.prod(sizes.values())
    try:
        devices = aot.tpu_devices(f"{tpu}-{chips * CORES_PER_CHIP[tpu]}")
    except aot.TopologyError as e:
        raise PlanError(f"--compile: {e}") from None
    impl = "pallas" if req.attention == "flash" else "xla"
    config = dataclasses.replace(config, attention_impl=impl)
    layout = Layout.create(MeshConfig(**sizes), devices=devices).for_model(config)
    dtype = resolve_dtype(req.dtype)
    patches = image_tokens * config.vision.merge_unit
    if req.mode == "train":
        from qwenvl_jax.data.pipeline import DataConfig

        data = DataConfig(seq_len=req.seq_len, patch_budget=max(patches, config.vision.merge_unit))
        programs = [aot.compile_train_step(config, layout, data, rows=req.batch, stage="all", dtype=dtype,
                                           loss_chunk=req.loss_chunk)]
        flops = req.batch * (req.seq_len * train_flops_per_token(config, req.seq_len)
                             + patches * vision_flops_per_patch(config))
        step = programs[0].summary()
        moved = step["argument_bytes"] + step["output_bytes"]  # the state is read and written once
    else:
        new = min(INFER_NEW_TOKENS, req.seq_len // 2)
        programs = list(aot.compile_generation(config, layout, batch=req.batch, prompt_len=req.seq_len - new,
                                               max_new_tokens=new, image_tokens=image_tokens, dtype=dtype))
        # One decode step: each row's new token through the LLM against a full cache (the bound that
        # matters for serving: decode reads every weight and the whole cache per step).
        flops = req.batch * text_forward_flops_per_token(config, req.seq_len)
        step = programs[1].summary()
        moved = step["argument_bytes"]
    summaries = [p.summary() for p in programs]
    peak_flops, hbm_gbps = CHIP_PEAKS[tpu]
    compute_s = flops / chips / (peak_flops * 1e12)
    memory_s = moved / (hbm_gbps * 1e9)
    peak = max(x["peak_bytes"] for x in summaries)
    return {"programs": summaries, "peak_bytes": peak, "estimate_bytes": estimate,
            "estimate_vs_compiled": estimate / peak if peak else None,
            "flops_per_chip": flops / chips, "bytes_per_chip_lower_bound": moved,
            "step": "train step" if req.mode == "train" else "decode step",
            "step_time_lower_bound_s": max(compute_s, memory_s), "compute_bound_s": compute_s,
            "memory_bound_s": memory_s, "mfu_ceiling": compute_s / max(compute_s, memory_s),
            "fits": peak <= HBM_GIB[tpu] * GIB}


def _dims(config, req, image_tokens, layout, vision_global: bool):
    """(text config, vision config, local batch, ViT rows per chip). The ViT runs on slots: each
    window padded to its 64 patches, budgeted at 1.5 x the patches as the data pipeline does."""
    from qwenvl_jax.aot import vision_budgets

    b_local = local_shape(layout, ("batch",), (req.batch,))[0]
    patches, slots = vision_budgets(config, (req.batch if vision_global else b_local) * image_tokens)
    return config.text, config.vision, b_local, patches, slots


def _text_layer(layout, config, b, length, a: int, attention: str) -> int:
    """Forward intermediates of one decoder layer for b x length tokens, per chip."""
    t = config.text

    def tokens_by(*names_dims) -> int:  # bytes of a [b, length, ...] activation
        names, dims = zip(("batch", b), ("length", length), *names_dims)
        return local_bytes(layout, names, dims, a)

    hidden = 4 * tokens_by(("act_embed", t.hidden_size))  # x, norm(x), x + attn, norm(x + attn)
    q = 2 * tokens_by(("heads", t.num_attention_heads), ("head_dim", t.head_dim))  # q, attention out
    kv = 2 * tokens_by(("kv_heads", t.num_key_value_heads), ("head_dim", t.head_dim))
    mlp = 3 * tokens_by(("mlp", t.intermediate_size))  # gate, up, silu(gate) * up
    total = hidden + q + kv + mlp
    if attention == "dense":  # f32 scores + probs in the compute dtype, [B, H, L, L]
        total += local_bytes(layout, ("batch", "heads", None, None),
                             (b, t.num_attention_heads, length, length), 4 + a)
    return total


def _vision_block(layout, config, patches: int, a: int) -> int:
    """Forward intermediates of one vision block over `patches` rows (slots), per chip."""
    v = config.vision
    hidden = 4 * local_bytes(layout, ("length", None), (patches, v.hidden_size), a)
    qkv = local_bytes(layout, ("length", "vision_qkv"), (patches, 3 * v.hidden_size), a)  # fused, whole
    heads = 4 * local_bytes(layout, ("length", "vision_heads", "head_dim"),
                            (patches, v.num_heads, v.head_dim), a)  # q, k, v, attention out
    mlp = 3 * local_bytes(layout, ("length", "vision_mlp"), (patches, v.intermediate_size), a)
    return hidden + qkv + heads + mlp


def _head_param(config) -> str:
    return "language_model.embed_tokens.embedding" if config.tie_word_embeddings else "lm_head.kernel"


def _train_activations(config, layout, params, req, image_tokens, a) -> dict:
    t, v, b, patches, slots = _dims(config, req, image_tokens, layout, vision_global=False)
    is_text_layer = lambda p: p.startswith("language_model.layers.")  # noqa: E731
    is_vision_block = lambda p: p.startswith("visual.blocks.")  # noqa: E731
    head = _head_param(config)
    saved_text = t.num_hidden_layers * local_bytes(layout, HIDDEN, (b, req.seq_len, t.hidden_size), a)
    saved_vision = (v.depth * slots * v.hidden_size * a  # block inputs (replicated over tensor)
                    + patches * v.patch_dim * 4)  # f32 pixel rows (normalized from uint8 on device)
    # XLA converts every layer's f32 master weights to the compute dtype at once, outside the
    # layer loop (seen in the compiled buffer assignment): one compute-dtype copy of the params.
    compute_copy = sum(param_bytes(params, layout, a).values()) if a < 4 else 0
    # Each phase: 2x forward intermediates (+ their gradients), 2x gathered weights (+ weight grads).
    layer = (2 * _text_layer(layout, config, b, req.seq_len, a, req.attention)
             + 2 * gathered_weight_bytes(params, layout, a, is_text_layer))
    chunk = min(req.loss_chunk or req.seq_len, req.seq_len)
    logits = (2 * local_bytes(layout, ("batch", "length", "vocab"), (b, chunk, t.vocab_size), 4)
              + 2 * gathered_weight_bytes(params, layout, a, lambda p: p == head))
    vision = (2 * _vision_block(layout, config, slots, a)
              + 2 * gathered_weight_bytes(params, layout, a, is_vision_block)) if slots else 0
    phases = {"decoder_layer": layer, "logits": logits, "vision_block": vision}
    peak = max(phases, key=phases.get)
    return {"saved_layer_inputs": saved_text, "saved_vision_block_inputs": saved_vision,
            "compute_dtype_params": compute_copy, **{f"phase_{k}": n for k, n in phases.items()},
            "peak_phase": peak, "total": saved_text + saved_vision + compute_copy + phases[peak]}


def _infer_activations(config, layout, params, req, image_tokens, a) -> dict:
    t, v, b, patches, slots = _dims(config, req, image_tokens, layout, vision_global=True)
    hidden = 2 * local_bytes(layout, HIDDEN, (b, req.seq_len, t.hidden_size), a)  # scan carry in/out
    layer = (_text_layer(layout, config, b, req.seq_len, a, req.attention)
             + gathered_weight_bytes(params, layout, a, lambda p: p.startswith("language_model.layers.")))
    vision = (_vision_block(layout, config, slots, a) + patches * v.patch_dim * 4
              + gathered_weight_bytes(params, layout, a, lambda p: p.startswith("visual.blocks."))
              ) if patches else 0
    logits = local_bytes(layout, ("batch", "vocab"), (b, t.vocab_size), 4)
    phases = {"prefill_layer": layer, "vision_block": vision}
    peak = max(phases, key=phases.get)
    return {"prefill_hidden": hidden, "last_logits": logits,
            **{f"phase_{k}": n for k, n in phases.items()}, "peak_phase": peak,
            "total": hidden + logits + phases[peak]}


# -------------------------------------------------------------------------------------------- CLI
LABELS = {
    "params": ("params", {"train": "f32 master", "infer": "{dtype}"}),
    "optimizer": ("optimizer state", {"train": "AdamW mu+nu, f32"}),
    "gradients": ("gradients", {"train": "f32"}),
    "update_temporaries": ("update temporaries", {"train": "clipped grads + updates, f32"}),
    "kv_cache": ("KV cache", {"infer": "{dtype}, {seq_len} slots"}),
    "activations": ("activations", {"train": "estimate", "infer": "estimate"}),
}


def format_table(r: dict) -> str:
    mesh = ",".join(f"{k}={n}" for k, n in r["mesh"].items())
    rows = []
    for key, n in r["bytes_per_chip"].items():
        label, notes = LABELS[key]
        note = notes.get(r["mode"], "").format(**r)
        rows.append((f"{label} ({note})" if note else label, n))
    acts = r["activation_breakdown"]
    for key, n in acts.items():  # the saved tensors and the peak phase (the others are in --json)
        if key != "peak_phase" and (not key.startswith("phase_") or key == f"phase_{acts['peak_phase']}"):
            rows.append(("  " + key.replace("phase_", "peak: ").replace("_", " "), n))
    rows.append(("total (estimate)", r["total_bytes_per_chip"]))
    width = max(len(label) for label, _ in rows)
    lines = [f"Qwen2.5-VL {r['model']}  {r['mode']}  TPU {r['tpu']} x {r['chips']} chips  mesh {mesh}",
             f"seq {r['seq_len']}, batch {r['batch']} ({r['batch_per_shard']} per chip), "
             f"image tokens {r['image_tokens']}/sample, {r['dtype']}, {r['num_params'] / 1e9:.2f}B params",
             f"{'component':<{width}}  GiB/chip"]
    lines += [f"{label:<{width}}  {n / GIB:8.2f}" for label, n in rows]
    lines.append(fit_line(r))
    lines += ["assumptions:"] + [f"  - {s}" for s in r["assumptions"]]
    if "compiled" in r:
        lines += compiled_lines(r)
    return "\n".join(lines)


def compiled_lines(r: dict) -> list[str]:
    c = r["compiled"]
    cols = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes")
    width = max(len(p["name"]) for p in c["programs"])
    lines = [f"compiled for TPU {r['tpu']} x {r['chips']} chips (XLA:TPU, no TPU used), GiB per chip:",
             f"  {'program':<{width}}  arguments  outputs  temporaries  aliased    peak  Mosaic kernels  compile s"]
    for p in c["programs"]:
        nums = "".join(f"{p[k] / GIB:>{w}.2f}" for k, w in zip(cols, (11, 9, 13, 9, 8)))
        lines.append(f"  {p['name']:<{width}}{nums}  {p['mosaic_kernels']:>14}  {p['compile_s']:>9.1f}")
    ratio = c["estimate_vs_compiled"]
    lines.append(f"  estimate {c['estimate_bytes'] / GIB:.2f} GiB vs compiled peak {c['peak_bytes'] / GIB:.2f} GiB"
                 + (f" ({100 * (ratio - 1):+.0f}%)" if ratio else "")
                 + f"; fits: {'yes' if c['fits'] else 'no'}")
    lines.append(f"  {c['step']}: {c['flops_per_chip'] / 1e12:.3g} TFLOP/chip (analytic), >= "
                 f"{c['bytes_per_chip_lower_bound'] / GIB:.2f} GiB HBM traffic/chip -> >= "
                 f"{1e3 * c['step_time_lower_bound_s']:.3g} ms (compute {1e3 * c['compute_bound_s']:.3g} ms, "
                 f"memory {1e3 * c['memory_bound_s']:.3g} ms): MFU ceiling {100 * c['mfu_ceiling']:.0f}%")
    return lines


def fit_line(r: dict) -> str:
    hbm_gib = r["hbm_bytes_per_chip"] / GIB
    pct = 100 * r["fraction_of_hbm"]
    headroom = (r["hbm_bytes_per_chip"] - r["total_bytes_per_chip"]) / GIB
    if not r["fits"]:
        return f"fits: no ({pct:.0f}% of {hbm_gib:.0f} GiB HBM per chip; {-headroom:.1f} GiB over)"
    warn = "; under 10% headroom for unmodelled temporaries" if r["fraction_of_hbm"] > TIGHT else ""
    return f"fits: yes ({pct:.0f}% of {hbm_gib:.0f} GiB HBM per chip; {headroom:.1f} GiB headroom{warn})"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 1, like every other bad input
        raise PlanError(message)


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog="python -m qwenvl_jax.plan", description=__doc__.split("\n\n")[0],
                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="preset: 3b, 7b, 32b, 72b, tiny, or a YAML path")
    ap.add_argument("--mesh", required=True, metavar="data=A,fsdp=B,tensor=C",
                    help="mesh sizes; one may be -1 (then --devices is required)")
    ap.add_argument("--devices", type=int, help="number of chips (only with a -1 mesh axis)")
    ap.add_argument("--seq-len", type=int, default=8192, help="tokens per sample (infer: cache slots)")
    ap.add_argument("--batch", type=int, default=1, help="global batch (samples)")
    ap.add_argument("--tpu", default="v5p", help=f"{', '.join(sorted(HBM_GIB))} (v5litepod = v5e), or a "
                    "slice name (v5p-64 = 32 chips: v4/v5p names count TensorCores)")
    ap.add_argument("--mode", default="train", help="train or infer")
    ap.add_argument("--dtype", default="bfloat16", help="compute / activation dtype (infer: also params)")
    ap.add_argument("--image-tokens", type=int, help="image tokens per sample (default: seq-len / 4)")
    ap.add_argument("--loss-chunk", type=int, default=2048,
                    help="train: logits computed T tokens at a time (train.loss_chunk; 0 = all at once)")
    ap.add_argument("--attention", default="flash", help="flash (default) or dense ([L, L] scores)")
    ap.add_argument("--compile", action="store_true",
                    help="also compile the real train step (or prefill + decode) for the slice with XLA:TPU, "
                         "no TPU needed (the 'tpu' extra), and print XLA's per-chip memory beside the estimate")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.compile and "JAX_PLATFORMS" not in os.environ:
            # A deviceless compile needs no accelerator: never take this machine's (a TPU VM's
            # chips may be busy training).
            jax.config.update("jax_platforms", "cpu")
        result = plan(Request(model=args.model, mesh=args.mesh, seq_len=args.seq_len, batch=args.batch,
                              tpu=args.tpu, mode=args.mode, dtype=args.dtype, devices=args.devices,
                              image_tokens=args.image_tokens, loss_chunk=args.loss_chunk,
                              attention=args.attention, compile=args.compile))
    except ValueError as e:  # PlanError, ConfigError, MeshError: one line, no traceback
        return user_error(e)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
