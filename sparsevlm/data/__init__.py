"""Data: built-in shapes VQA, tokenizers and batching."""
