"""qwenvl_jax: Qwen2.5-VL in JAX/Flax for Cloud TPU, numerically matched to transformers.

    import qwenvl_jax
    model = qwenvl_jax.load_pretrained("path/to/Qwen2.5-VL-7B-Instruct", dtype="bfloat16")
    processor = qwenvl_jax.Processor.from_pretrained("path/to/Qwen2.5-VL-7B-Instruct")
    logits = model(**processor(text=prompt, images=["cat.jpg"]))
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {  # public name -> module; imported on first use so `import qwenvl_jax` stays cheap
    "Qwen25VLConfig": "qwenvl_jax.config",
    "VisionConfig": "qwenvl_jax.config",
    "TextConfig": "qwenvl_jax.config",
    "ConfigError": "qwenvl_jax.config",
    "load_pretrained": "qwenvl_jax.pretrained",
    "init_model": "qwenvl_jax.pretrained",
    "PretrainedModel": "qwenvl_jax.pretrained",
    "Processor": "qwenvl_jax.processing.processor",
    "get_rope_index": "qwenvl_jax.processing.rope_index",
    "CheckpointError": "qwenvl_jax.weights.load",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwenvl_jax' has no attribute {name!r}")
