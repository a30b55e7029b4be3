"""The tests' tiny tokenizer lives in the package (the training demo builds one too)."""

from qwenvl_jax.processing.tiny_tokenizer import *  # noqa: F401,F403
