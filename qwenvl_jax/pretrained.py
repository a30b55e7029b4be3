"""The user-facing model object: config + params, callable on HF-named batches.

    model = qwenvl_jax.load_pretrained("Qwen/Qwen2.5-VL-7B-Instruct")   # directory or hub id, its own dtype
    logits = model(**processor(text=..., images=[...]))   # [B, L, vocab]
    model.save_pretrained("out/")    # HF safetensors + config.json + the source's tokenizer/processor files

The NNX module is split once into (graphdef, params); the jitted forward is a pure function of
params and inputs and merges inside. With `mesh=` the params live sharded over the mesh (see
sharding.py) and the forward is jitted with explicit in/out shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Format
from jax.sharding import NamedSharding, PartitionSpec

from qwenvl_jax.batch import ModelInputs, prepare_inputs
from qwenvl_jax.config import ATTENTION_IMPLS, ConfigError, Qwen25VLConfig
from qwenvl_jax.model.qwen25vl import Qwen25VL
from qwenvl_jax.model.vision_layout import VisionInputs
from qwenvl_jax.sharding import Layout, MeshConfig, active, param_shardings
from qwenvl_jax.weights import hub
from qwenvl_jax.weights.export import GATHER_BYTES, save_hf_checkpoint
from qwenvl_jax.weights.load import CheckpointTensors, load_params
from qwenvl_jax.weights.lora import LoraAdapter, MergedTensors

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a checkpoint's config.json names (`torch_dtype`, or transformers 5.x's `dtype`), which
    dtype="auto" uses, as in transformers; float32 when it names none we run."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "float32"  # the config's own loader reports an unreadable file
    if not isinstance(cfg, dict):
        return "float32"
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("dtype") or text.get("torch_dtype")
    return dtype if dtype in DTYPES else "float32"


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


class PretrainedModel:
    """Qwen2.5-VL with its params. `model(**batch)` returns logits [B, L, vocab].

    source_dir: the checkpoint (or tokenizer) directory the model came from, if any; save_pretrained
    copies its tokenizer, processor and generation files next to the weights.
    """

    def __init__(self, config: Qwen25VLConfig, graphdef, params, layout: Layout | None = None,
                 source_dir: str | Path | None = None):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.source_dir = None if source_dir is None else Path(source_dir)
        self.layout = (layout or Layout.create()).for_model(config)
        self.param_shardings = param_shardings(params, self.layout)
        self._layer_states = None  # (stacked leaf they were sliced from, per-layer states)
        self._placed = None  # (formats, params) of the last place_params: a repeat is free

    def place_params(self, formats) -> None:
        """Moves the params into the layouts a decode program compiled with `Layout.AUTO` for them
        chose (its input formats for the params): a TPU step wants some weights transposed, and
        placing them once saves relaying ~70% of the decoder weights out on every call. Leaf by
        leaf, each old buffer donated, so memory grows by one leaf at most; nothing moves when they
        already lie so. Programs compiled later take the params as they now lie."""
        if self._placed is not None and self._placed[0] is formats and self._placed[1] is self.params:
            return
        leaves, tree = jax.tree.flatten(self.params)
        targets = jax.tree.leaves(formats, is_leaf=lambda f: isinstance(f, Format))
        if len(targets) != len(leaves):
            raise ValueError(f"{len(targets)} formats for {len(leaves)} params")
        # layout None: the program does not read the leaf (CPU decode reads per-layer copies)
        moved = [x if f.layout is None or x.format.layout == f.layout
                 else jax.device_put(x, Format(f.layout, x.sharding), donate=True) for x, f in zip(leaves, targets)]
        if any(m is not x for m, x in zip(moved, leaves)):
            self.params = jax.tree.unflatten(tree, moved)
        self._placed = (formats, self.params)

    @property
    def module(self) -> Qwen25VL:
        return nnx.merge(self.graphdef, self.params)

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                position_ids=None, mm_token_type_ids=None) -> ModelInputs:
        """HF-named batch (numpy or jax arrays) -> validated ModelInputs with MRoPE positions."""
        del mm_token_type_ids  # transformers 5.x processor output; implied by input_ids here
        return prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                              pixel_values_videos, video_grid_thw, second_per_grid_ts, position_ids)

    def __call__(self, **batch):
        """logits [B, L, vocab] for an HF-named batch (see `prepare`)."""
        return self.forward(self.prepare(**batch))

    def forward(self, inputs: ModelInputs):
        """logits [B, L, vocab], sharded over (batch, -, vocab) of the model's layout."""
        lay = self.layout
        args = (lay.put(inputs.input_ids, BATCH), lay.put(inputs.position_ids, POSITIONS),
                lay.put(inputs.segment_ids, BATCH), put_vision(lay, inputs.vision),
                put_optional(lay, inputs.vision_token_index, BATCH))
        b, length = inputs.input_ids.shape
        out = lay.sharding(("batch", "length", "vocab"), (b, length, self.config.text.vocab_size))
        in_shardings = (self.param_shardings, *(jax.tree.map(lambda x: x.sharding, a) for a in args))
        return _forward_fn(self.graphdef, lay, in_shardings, out)(self.params, *args)

    def decoder_layer_states(self) -> list | None:
        """On CPU, the decoder layers' params as one state per layer, sliced once and kept for
        generation; None on other platforms. XLA:CPU copies the slice of a stacked weight into a
        buffer before each matmul that reads it, so a decode step slicing layers inside the program
        would move every weight three times (a TPU fuses the slice into the matmul). The price is a
        second copy of the decoder weights in host memory while the model is used for generation."""
        if self.layout.platform != "cpu":
            return None
        stacked = self.params["language_model"]["layers"]
        first = jax.tree.leaves(stacked)[0]
        if self._layer_states is None or self._layer_states[0] is not first:  # params replaced since
            n = first.shape[0]

            def one_layer(sharding):
                return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))

            per_layer = jax.tree.map(lambda a: one_layer(a.sharding), stacked)
            split = jax.jit(lambda s: [jax.tree.map(lambda a, i=i: a[i], s) for i in range(n)],
                            out_shardings=[per_layer] * n)
            self._layer_states = (first, split(stacked))
        return self._layer_states[1]

    def save_pretrained(self, out_dir: str | Path, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                        gather_bytes: int = GATHER_BYTES, side_files_from: str | Path | None = None) -> Path:
        """A complete HF checkpoint that transformers, vLLM and `python -m qwenvl_jax.infer` load:
        safetensors (+ index when sharded) and config.json, plus the tokenizer, chat template,
        processor and generation files (weights.export.SIDE_FILES) that `side_files_from` or else
        the model's `source_dir` (the directory load_pretrained read) holds. dtype defaults to the
        params' dtype.

        A model with neither (init_model without side_files_from) gets weights and config.json
        only: no tokenizer, chat template, preprocessor_config.json or generation_config.json, so
        processors (ours, transformers' AutoProcessor) cannot load from out_dir until they are
        added. With several processes every one calls it (tensors are gathered in blocks of at
        most `gather_bytes`); process 0 writes, side files included."""
        return save_hf_checkpoint(out_dir, self.params, self.config, dtype=dtype,
                                  max_shard_bytes=max_shard_bytes, gather_bytes=gather_bytes,
                                  side_files_from=side_files_from or self.source_dir)


BATCH = ("batch", "length")
POSITIONS = (None, "batch", "length")


def put_vision(layout: Layout, vision: VisionInputs | None) -> VisionInputs | None:
    """The vision tower's inputs with their rows over the batch axes (one shared row, as in
    inference, is replicated)."""
    if vision is None:
        return None
    return jax.tree.map(lambda x: layout.put(x, ("batch",) + (None,) * (x.ndim - 1)), vision)


def put_optional(layout: Layout, x, names):
    return None if x is None else layout.put(x, names)


def _shardings_key(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=64)
def _jit_forward(graphdef, layout, in_key, out_sharding):
    in_shardings = jax.tree.unflatten(in_key[0], in_key[1])

    def forward(params, input_ids, position_ids, segment_ids, vision, vision_token_index):
        with active(layout):
            return nnx.merge(graphdef, params)(input_ids, position_ids, segment_ids, vision, vision_token_index)

    return jax.jit(forward, in_shardings=in_shardings, out_shardings=out_sharding)


def _forward_fn(graphdef, layout, in_shardings, out_sharding):
    return _jit_forward(graphdef, layout, _shardings_key(in_shardings), out_sharding)


def make_layout(mesh: Layout | MeshConfig | str | None, rules=None) -> Layout:
    if isinstance(mesh, Layout):
        return mesh
    return Layout.create(mesh, overrides=rules)


def with_attention_impl(config: Qwen25VLConfig, attention_impl: str | None) -> Qwen25VLConfig:
    if attention_impl is None:
        return config
    if attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {list(ATTENTION_IMPLS)}, got {attention_impl!r}")
    return dataclasses.replace(config, attention_impl=attention_impl)


def load_pretrained(path: str | Path, dtype="auto", mesh=None, rules=None, attention_impl: str | None = None,
                    adapter: str | Path | None = None, revision: str | None = None,
                    adapter_revision: str | None = None) -> PretrainedModel:
    """Loads an HF Qwen2.5-VL checkpoint: a directory (config.json + safetensors or PyTorch .bin,
    single or sharded) or a hub id such as "Qwen/Qwen2.5-VL-3B-Instruct" (from the local hub cache
    or downloaded, through huggingface_hub; `revision` as in transformers).

    dtype: "auto" (the checkpoint's own torch_dtype, as transformers does), "bfloat16", "float32"
    or "float16": the params' and the computation's dtype.
    adapter: a PEFT LoRA adapter directory or hub id, merged into the weights as they load.
    mesh: None (one device), 'data=1,fsdp=2,tensor=4', a MeshConfig, a jax Mesh or a Layout; each
    parameter is read straight into its shards. rules: overrides of sharding.DEFAULT_RULES.
    attention_impl: "auto" (default: Pallas kernels on TPU, XLA elsewhere), "xla", or "pallas"
    (interpret mode off TPU: slow, for checks).
    """
    path = hub.resolve(path, revision)
    config = with_attention_impl(Qwen25VLConfig.from_hf_file(path), attention_impl)
    dt = resolve_dtype(checkpoint_dtype(path) if dtype == "auto" else dtype)
    tensors = None
    if adapter is not None:
        lora = LoraAdapter(hub.resolve(adapter, adapter_revision, adapter=True))
        tensors = MergedTensors(CheckpointTensors(path), lora, tied=config.tie_word_embeddings)
        if tensors.untied:  # the adapter changed the embedding or the head of a tied model
            config = dataclasses.replace(config, tie_word_embeddings=False)
    layout = make_layout(mesh, rules).for_model(config)
    graphdef, params = load_params(path, config, param_dtype=dt, layout=layout, tensors=tensors)
    return PretrainedModel(config, graphdef, params, layout, source_dir=path)


def init_model(config: Qwen25VLConfig, seed: int = 0, dtype="float32", mesh=None, rules=None,
               attention_impl: str | None = None) -> PretrainedModel:
    """Randomly initialised model (tests, training from scratch), created in its shards; it has no
    source_dir (pass save_pretrained a side_files_from for a complete checkpoint)."""
    config = with_attention_impl(config, attention_impl)
    layout = make_layout(mesh, rules).for_model(config)

    def create():
        return nnx.split(Qwen25VL(config, rngs=nnx.Rngs(seed), param_dtype=resolve_dtype(dtype)))[1]

    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: Qwen25VL(config, rngs=nnx.Rngs(seed), param_dtype=resolve_dtype(dtype))))
    params = jax.jit(create, out_shardings=param_shardings(abstract, layout))()
    return PretrainedModel(config, graphdef, params, layout)
