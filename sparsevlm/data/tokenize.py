"""Tokenizers: the built-in word-level one (HF `tokenizers`), wrapped as a `transformers` fast tokenizer."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a closed vocabulary; ids 0–3 are PAD, UNK, BOS, EOS."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return wrap(tokenizer)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A raw `tokenizers.Tokenizer` as a `transformers` tokenizer with our special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
    )


def tokenizer_to_json(tokenizer: PreTrainedTokenizerFast) -> str:
    """Serialised form stored next to a model's params."""
    return tokenizer.backend_tokenizer.to_str()


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    """Inverse of `tokenizer_to_json`."""
    return wrap(Tokenizer.from_str(text))
