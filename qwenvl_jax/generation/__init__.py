"""Turning model outputs into results: decoding helpers and grounding (boxes / points) post-processing."""
