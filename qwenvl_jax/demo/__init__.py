"""A shapes-world demo: generated images with counting, attribute and grounding questions whose answers
the picture decides exactly, so a small model's fine-tuning progress is measurable (`qwenvl_jax.eval`)."""
