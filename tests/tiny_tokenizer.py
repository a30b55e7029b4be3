"""The tests' tiny tokenizer lives in the package (the training demo builds one too)."""

from qwenvl_jax.processing.tiny_tokenizer import make_tiny_tokenizer, write_preprocessor_config  # noqa: F401
