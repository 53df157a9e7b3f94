"""`ModelBundle`: a model as a value — config, params, tokenizer, metadata, masks and HF processor."""

from __future__ import annotations

import dataclasses
from typing import Any

from sparsevlm.config import VLMConfig

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """Everything needed to run a model: config, param tree, tokenizer, metadata and, once pruned, masks.

    `masks` is a tree like `params` with a boolean keep-mask for every pruned kernel and None elsewhere.
    `processor` is the HF processor of a model loaded from a Hugging Face checkpoint (its files are
    kept in `metadata["hf"]`, so it survives a save and load). `tokenizer` is a `transformers`
    tokenizer.
    """

    config: VLMConfig
    params: PyTree
    tokenizer: Any
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    masks: PyTree | None = None
    processor: Any = None

    @property
    def image_processor(self) -> Any:
        """The HF image processor (resize / crop as the checkpoint expects); None for built-in models."""
        return getattr(self.processor, "image_processor", None)

    @property
    def instruction_tokenizer(self) -> Any:
        """InstructBLIP's Q-Former tokenizer (its prompt goes to the Q-Former too); None for other models."""
        if not self.config.connector.reads_text:
            return None
        tokenizer = getattr(self.processor, "qformer_tokenizer", None)
        if tokenizer is None:
            raise ValueError("this model's Q-Former reads the instruction but its processor has no qformer_tokenizer")
        return tokenizer
