"""``build_tokenizer(args)``: pick the tokenizer by ``--tokenizer-type`` and pad its vocab."""

from __future__ import annotations

import logging
from typing import Any

from megatron.errors import UsageError
from megatron.tokenizer.base import AbstractTokenizer

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HFTokenizer",
    "NullTokenizer",
)


def create_tokenizer(args: Any) -> AbstractTokenizer:
    """The tokenizer named by ``args.tokenizer_type``, built from its files/flags."""
    kind = getattr(args, "tokenizer_type", None)
    if not kind:
        raise UsageError(
            f"--tokenizer-type is required; choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if kind == "GPT2BPETokenizer":
        from megatron.tokenizer.gpt2_tokenizer import GPT2BPETokenizer

        return GPT2BPETokenizer(args.vocab_file, args.merge_file)
    if kind == "SentencePieceTokenizer":
        from megatron.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(args.tokenizer_model)
    if kind == "GPTSentencePieceTokenizer":
        from megatron.tokenizer.sentencepiece_tokenizer import GPTSentencePieceTokenizer

        return GPTSentencePieceTokenizer(args.tokenizer_model)
    if kind == "HFTokenizer":
        from megatron.tokenizer.hf_tokenizer import HFTokenizer

        return HFTokenizer(args.tokenizer_model)
    if kind == "NullTokenizer":
        from megatron.tokenizer.null_tokenizer import NullTokenizer

        return NullTokenizer(args.vocab_size)
    raise UsageError(
        f"--tokenizer-type {kind}: unknown tokenizer; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def vocab_size_with_padding(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * tensor_parallel_size`` so the
    embedding splits evenly over tensor-parallel ranks and stays GEMM-friendly."""
    multiple = int(divisible_by) * int(tensor_parallel_size)
    if multiple <= 0:
        raise UsageError(
            f"--make-vocab-size-divisible-by ({divisible_by}) times --tensor-model-parallel-size "
            f"({tensor_parallel_size}) must be positive"
        )
    return -(-int(vocab_size) // multiple) * multiple


def build_tokenizer(args: Any) -> AbstractTokenizer:
    """Build the tokenizer for ``args`` and set ``args.padded_vocab_size``."""
    tokenizer = create_tokenizer(args)
    args.padded_vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    logger.info(
        "tokenizer %s: vocab size %d padded to %d (%d dummy tokens)",
        tokenizer.name,
        tokenizer.vocab_size,
        args.padded_vocab_size,
        args.padded_vocab_size - tokenizer.vocab_size,
    )
    return tokenizer
