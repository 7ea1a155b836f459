"""A tokenizer for data that is already ids: whitespace-separated integers."""

from __future__ import annotations

from collections.abc import Sequence

from megatron.errors import UsageError
from megatron.tokenizer.base import AbstractTokenizer


class NullTokenizer(AbstractTokenizer):
    """Text ``"5 17 3"`` is ids ``[5, 17, 3]``; ids ``0..vocab_size-1`` are data, EOD is
    ``vocab_size`` (so the tokenizer's own vocab_size is one more, like Megatron's)."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int | None) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise UsageError(
                f"--tokenizer-type NullTokenizer needs --vocab-size > 0 (got {vocab_size})"
            )
        self._eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        ids = []
        for tok in text.split():
            try:
                ids.append(int(tok))
            except ValueError:
                raise UsageError(
                    f"NullTokenizer: {tok!r} is not an integer id; its text must be "
                    "whitespace-separated integers"
                ) from None
        for token_id in ids:
            if not 0 <= token_id <= self._eod:
                raise UsageError(
                    f"NullTokenizer: id {token_id} is outside 0..{self._eod} "
                    f"(--vocab-size {self._eod}, EOD {self._eod})"
                )
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)
