"""OpenAI-compatible serving with continuous batching: python -m qwenvl_jax.serve."""
