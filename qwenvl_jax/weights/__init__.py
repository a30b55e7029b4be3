"""HF safetensors checkpoints in and out."""
