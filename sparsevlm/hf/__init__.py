"""Hugging Face checkpoints ↔ the Flax VLM: configs, safetensors, name rules per family."""
