"""The interface every tokenizer exposes, and the file checks they share."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

from megatron.errors import UsageError


class AbstractTokenizer(ABC):
    """What the data pipeline and training need from a tokenizer.

    ``tokenize`` maps text to ids and ``detokenize`` maps ids back; ``eod`` is the id that
    ends a document (appended by ``tools/preprocess_data.py --append-eod`` and used for the
    position/attention resets); ``pad`` is the id used for padding.
    """

    name: str = "abstract"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before padding for the embedding)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id of the end-of-document token."""

    @property
    def pad(self) -> int:
        """Id used for padding; the end-of-document id unless the tokenizer has its own."""
        return self.eod

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text``."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text; tokenizers with a fast batch path override this."""
        return [self.tokenize(text) for text in texts]


def require_file(path: str | None, flag: str, what: str, tokenizer_type: str) -> str:
    """Return ``path`` if it names an existing file, else raise a UsageError naming ``flag``."""
    if not path:
        raise UsageError(f"--tokenizer-type {tokenizer_type} needs {flag} ({what})")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path}: no such file; give the path to the {what}")
    return path
