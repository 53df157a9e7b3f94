"""Flax model families."""

from sparsevlm.models.decoder import Decoder, init_cache
from sparsevlm.models.vit import ViT
from sparsevlm.models.vlm import TOWERS, VLM

__all__ = ["VLM", "ViT", "Decoder", "init_cache", "TOWERS"]
