"""sparsevlm: pruning vision-language models and restoring them with SparseLoRA, in JAX/Flax."""

__version__ = "0.1.0"
