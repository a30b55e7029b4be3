"""Host-side preprocessing (numpy, PIL, tokenizers): no jax, no model imports."""
