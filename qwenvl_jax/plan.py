"""python -m qwenvl_jax.plan: per-chip HBM estimate for training or serving Qwen2.5-VL on a TPU mesh.

    python -m qwenvl_jax.plan --model 72b --mesh fsdp=64,tensor=4 --seq-len 32768 --batch 64 --tpu v5p
    python -m qwenvl_jax.plan --model 7b --mesh fsdp=2,tensor=4 --seq-len 8192 --tpu v5e --mode infer
    python -m qwenvl_jax.plan --model 7b --mesh fsdp=-1,tensor=4 --tpu v5p-64 --batch 8 --json  # 32 chips

Prints bytes per chip for params, optimizer state, gradients and activations (train), or params,
KV cache and activations (infer), and whether the total fits the TPU's HBM per chip.
Nothing is allocated and no devices are needed: parameter shapes come from `nnx.eval_shape`
(weights.load.abstract_model), optimizer state shapes from `jax.eval_shape(optax.adamw(...).init)`,
and every array is placed with the real `sharding.Layout` rules over a `jax.sharding.AbstractMesh`,
so the per-chip shard of each array is exactly the one a real run would hold (a dimension is split
only where the rules split it; head axes that do not divide over `tensor` are replicated).

Params, optimizer state, gradients and KV cache are exact. Activations are an ESTIMATE under these
assumptions (`ASSUMPTIONS`, also printed):
  train  f32 master params, f32 AdamW mu/nu and f32 gradients, all sharded like the params; compute
         and activations in --dtype. Per-layer full rematerialisation: only each decoder layer's
         input [B_local, L, D] is kept across layers (likewise each vision block's input), and one
         layer's working set lives at a time: its forward intermediates (normed inputs, q/k/v,
         attention output, projections, the MLP's gate/up/act) plus as many bytes again for their
         gradients, plus that layer's weights and weight-gradients all-gathered over fsdp. Attention
         is a flash/splash kernel (no [L, L] scores; --attention dense adds them). The loss
         materialises f32 logits [B_local, L, vocab/tensor] and their gradient (--loss-chunk T:
         T tokens at a time). Peak = saved inputs + the largest phase (decoder layer / logits /
         vision block): the phases run one after another.
  infer  params and KV cache in --dtype; the KV cache has --seq-len slots (prompt + generated);
         the peak is the prefill of --seq-len tokens through one layer at a time (forward only),
         plus f32 logits of the last position.
  vision --image-tokens of each sample's --seq-len are image tokens (default 25%), each from
         spatial_merge_size**2 = 4 patches. Inference replicates the vision inputs of the whole batch
         on every chip (pretrained.put_vision); training assumes the train step shards them over
         the batch axes like the text.
XLA temporaries, fragmentation, collectives' buffers and the runtime's reserve are not modelled:
leave headroom (the fit line flags totals above 90% of HBM).
Bad input: one `error: ...` line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh

from qwenvl_jax.cli import user_error
from qwenvl_jax.config import Qwen25VLConfig
from qwenvl_jax.sharding import DEFAULT_RULES, MESH_AXES, Layout, MeshConfig, MeshError

GIB = 2**30
# HBM per chip. Google's pages say "GB"; these are the sizes the runtime reports per chip (v5p: 95).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}
# Slice names count TensorCores: v4-8 and v5p-8 are 4 chips (2 cores each), v5litepod-8 is 8 chips.
CORES_PER_CHIP = {"v4": 2, "v5e": 1, "v5p": 2, "v6e": 1}
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
TIGHT = 0.9  # above this fraction of HBM the fit line warns: unmodelled temporaries may not fit

HIDDEN = ("batch", "length", "act_embed")  # decoder.HIDDEN: residual stream, replicated over tensor
ASSUMPTIONS = {
    "train": [
        "estimate: params f32 master, AdamW mu/nu f32, gradients f32, all sharded like the params",
        "activations in the compute dtype; per-layer full remat: only each layer's input is saved",
        "one layer's working set at a time: forward intermediates + as much again for their "
        "gradients + its weights and weight-gradients all-gathered over fsdp",
        "attention: flash/splash kernel, no [L, L] scores (unless --attention dense)",
        "loss: f32 logits [B_local, L or --loss-chunk, vocab/tensor] and their gradient",
        "vision: image patches sharded over the batch axes like the text (train step's job)",
        "peak = saved layer inputs + the largest of the phases (decoder layer / logits / vision)",
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
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
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
    loss_chunk: int = 0  # 0: the whole sequence's logits at once
    attention: str = "flash"


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
        components = {"params": pbytes, "optimizer": adamw_state_bytes(params, layout), "gradients": pbytes}
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
    }


def _dims(config, req, image_tokens, layout, vision_global: bool):
    t, v = config.text, config.vision
    b_local = local_shape(layout, ("batch",), (req.batch,))[0]
    patches = (req.batch if vision_global else b_local) * image_tokens * v.merge_unit
    return t, v, b_local, patches


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
    """Forward intermediates of one vision block over `patches` rows, per chip."""
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
    t, v, b, patches = _dims(config, req, image_tokens, layout, vision_global=False)
    is_text_layer = lambda p: p.startswith("language_model.layers.")  # noqa: E731
    is_vision_block = lambda p: p.startswith("visual.blocks.")  # noqa: E731
    head = _head_param(config)
    saved_text = t.num_hidden_layers * local_bytes(layout, HIDDEN, (b, req.seq_len, t.hidden_size), a)
    saved_vision = (v.depth * patches * v.hidden_size * a  # block inputs (replicated over tensor)
                    + patches * v.patch_dim * 4)  # f32 pixel rows
    # Each phase: 2x forward intermediates (+ their gradients), 2x gathered weights (+ weight grads).
    layer = (2 * _text_layer(layout, config, b, req.seq_len, a, req.attention)
             + 2 * gathered_weight_bytes(params, layout, a, is_text_layer))
    chunk = min(req.loss_chunk or req.seq_len, req.seq_len)
    logits = (2 * local_bytes(layout, ("batch", "length", "vocab"), (b, chunk, t.vocab_size), 4)
              + 2 * gathered_weight_bytes(params, layout, a, lambda p: p == head))
    vision = (2 * _vision_block(layout, config, patches, a)
              + 2 * gathered_weight_bytes(params, layout, a, is_vision_block)) if patches else 0
    phases = {"decoder_layer": layer, "logits": logits, "vision_block": vision}
    peak = max(phases, key=phases.get)
    return {"saved_layer_inputs": saved_text, "saved_vision_block_inputs": saved_vision,
            **{f"phase_{k}": n for k, n in phases.items()}, "peak_phase": peak,
            "total": saved_text + saved_vision + phases[peak]}


def _infer_activations(config, layout, params, req, image_tokens, a) -> dict:
    t, v, b, patches = _dims(config, req, image_tokens, layout, vision_global=True)
    hidden = 2 * local_bytes(layout, HIDDEN, (b, req.seq_len, t.hidden_size), a)  # scan carry in/out
    layer = (_text_layer(layout, config, b, req.seq_len, a, req.attention)
             + gathered_weight_bytes(params, layout, a, lambda p: p.startswith("language_model.layers.")))
    vision = (_vision_block(layout, config, patches, a) + patches * v.patch_dim * 4
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
    return "\n".join(lines)


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
    ap = _Parser(prog="python -m qwenvl_jax.plan", description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--loss-chunk", type=int, default=0, help="train: logits computed T tokens at a time")
    ap.add_argument("--attention", default="flash", help="flash (default) or dense ([L, L] scores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        result = plan(Request(model=args.model, mesh=args.mesh, seq_len=args.seq_len, batch=args.batch,
                              tpu=args.tpu, mode=args.mode, dtype=args.dtype, devices=args.devices,
                              image_tokens=args.image_tokens, loss_chunk=args.loss_chunk,
                              attention=args.attention))
    except ValueError as e:  # PlanError, ConfigError, MeshError: one line, no traceback
        return user_error(e)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
