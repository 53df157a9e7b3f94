"""Flax model families: ViT, Q-Former, decoder-only and T5 language models, and the VLM composing them."""
