"""The user-facing model object: config + params, callable on HF-named batches.

    model = qwenvl_jax.load_pretrained("Qwen2.5-VL-7B-Instruct", dtype="bfloat16")
    logits = model(**processor(text=..., images=[...]))   # [B, L, vocab]
    model.save_pretrained("out/")                          # HF safetensors + config.json

The NNX module is split once into (graphdef, params); the jitted forward is a pure function of
params and inputs and merges inside.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.batch import ModelInputs, prepare_inputs
from qwenvl_jax.config import ConfigError, Qwen25VLConfig
from qwenvl_jax.model.qwen25vl import Qwen25VL
from qwenvl_jax.weights.export import save_hf_checkpoint
from qwenvl_jax.weights.load import load_params

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


class PretrainedModel:
    """Qwen2.5-VL with its params. `model(**batch)` returns logits [B, L, vocab]."""

    def __init__(self, config: Qwen25VLConfig, graphdef, params):
        self.config = config
        self.graphdef = graphdef
        self.params = params

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
        return _forward(self.graphdef, self.params, inputs.input_ids, inputs.position_ids,
                        inputs.segment_ids, inputs.vision)

    def save_pretrained(self, out_dir: str | Path, dtype: str | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> Path:
        """HF safetensors checkpoint that transformers loads; dtype defaults to the params' dtype."""
        return save_hf_checkpoint(out_dir, self.params, self.config, dtype=dtype,
                                  max_shard_bytes=max_shard_bytes)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, input_ids, position_ids, segment_ids, vision):
    return nnx.merge(graphdef, params)(input_ids, position_ids, segment_ids, vision)


def load_pretrained(path: str | Path, dtype="bfloat16") -> PretrainedModel:
    """Loads an HF Qwen2.5-VL checkpoint directory (config.json + safetensors)."""
    config = Qwen25VLConfig.from_hf_file(path)
    dt = resolve_dtype(dtype)
    graphdef, params = load_params(path, config, param_dtype=dt)
    return PretrainedModel(config, graphdef, params)


def init_model(config: Qwen25VLConfig, seed: int = 0, dtype="float32") -> PretrainedModel:
    """Randomly initialised model (tests, training from scratch)."""
    model = Qwen25VL(config, rngs=nnx.Rngs(seed), param_dtype=resolve_dtype(dtype))
    graphdef, params = nnx.split(model)
    return PretrainedModel(config, graphdef, params)
