"""A shapes-world demo: generated images with counting, attribute and grounding questions whose answers
the picture decides exactly, so a small model's training progress is measurable (`qwenvl_jax.eval`).

DEMO_MODEL is the bundled checkpoint (HF layout; `python -m qwenvl_jax.infer` uses it when no
--checkpoint is given), SAMPLE_IMAGE its sample picture and SAMPLE_PROMPT the question asked about it.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL = DEMO_DIR / "model"  # configs/demo_stage1.yaml then configs/demo.yaml (docs/demo_model.md)
SAMPLE_IMAGE = DEMO_DIR / "sample.png"  # one blue triangle: the model is trained on one-shape pictures
SAMPLE_PROMPT = "Locate the blue triangle."
