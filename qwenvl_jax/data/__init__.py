"""Training data: record formats, random-access sources, media loading (host side, no jax)."""
