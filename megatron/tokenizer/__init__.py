"""Tokenizers: GPT-2 BPE, SentencePiece, local Hugging Face files, and pre-tokenized ids."""

from megatron.tokenizer.base import AbstractTokenizer
from megatron.tokenizer.tokenizer import (
    TOKENIZER_TYPES,
    build_tokenizer,
    create_tokenizer,
    vocab_size_with_padding,
)

__all__ = [
    "TOKENIZER_TYPES",
    "AbstractTokenizer",
    "build_tokenizer",
    "create_tokenizer",
    "vocab_size_with_padding",
]
