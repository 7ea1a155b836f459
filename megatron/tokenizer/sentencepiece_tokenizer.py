"""SentencePiece tokenizers with Megatron's two conventions.

``SentencePieceTokenizer`` extends the model's vocabulary with Megatron's special tokens
(<CLS>, <SEP>, <EOD>, <MASK>, and pad/bos/eos pieces where the model lacks them) and treats
their literal text as those tokens. ``GPTSentencePieceTokenizer`` uses the model's vocabulary
as is, with the model's end-of-sentence id as EOD.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sentencepiece

from megatron.errors import UsageError
from megatron.tokenizer.base import AbstractTokenizer, require_file


def _load(model_file: str | None, tokenizer_type: str) -> sentencepiece.SentencePieceProcessor:
    require_file(model_file, "--tokenizer-model", "SentencePiece .model file", tokenizer_type)
    try:
        return sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as exc:
        raise UsageError(
            f"--tokenizer-model {model_file} could not be loaded as a SentencePiece model "
            f"({exc}); pass a .model file written by sentencepiece"
        ) from None


class SentencePieceTokenizer(AbstractTokenizer):
    """Megatron's ``SentencePieceTokenizer``: model vocabulary plus Megatron special tokens."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str | None) -> None:
        self._sp = _load(model_file, self.name)
        self._vocab = {self._sp.id_to_piece(i): i for i in range(len(self._sp))}
        self._special: dict[str, int] = {}  # insertion order matters for ties at one position
        self._cls = self._add_special("<CLS>")
        self._sep = self._add_special("<SEP>")
        self._eod = self._add_special("<EOD>")
        self._mask = self._add_special("<MASK>")
        self._pad = self._add_special(self._piece_or(self._sp.pad_id(), "<PAD>"))
        self._bos = self._add_special(self._piece_or(self._sp.bos_id(), "<BOS>"))
        self._eos = self._add_special(self._piece_or(self._sp.eos_id(), "<EOS>"))
        self._inv_special = {i: t for t, i in self._special.items()}
        self._special_re = re.compile("|".join(re.escape(t) for t in self._special))

    def _piece_or(self, piece_id: int, fallback: str) -> str:
        if 0 <= piece_id < len(self._sp):
            return self._sp.id_to_piece(piece_id)
        return fallback

    def _add_special(self, token: str) -> int:
        if token not in self._vocab:
            self._vocab[token] = len(self._vocab)
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        # Special tokens written in the text become their ids; the spans between them go
        # through the SentencePiece model.
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids.extend(self._sp.encode_as_ids(text[start : match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        ids.extend(self._sp.encode_as_ids(text[start:]))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        # Special tokens are written as their text, set off by spaces like Megatron does.
        ids = [int(i) for i in ids]
        pieces: list[str] = []
        last = 0
        for pos, token_id in enumerate(ids):
            if token_id in self._inv_special:
                pieces.append(self._sp.decode_ids(ids[last:pos]) + " ")
                pieces.append(self._inv_special[token_id] + " ")
                last = pos + 1
        pieces.append(self._sp.decode_ids(ids[last:]))
        return "".join(pieces)


class GPTSentencePieceTokenizer(AbstractTokenizer):
    """Megatron's ``GPTSentencePieceTokenizer``: the model's own vocabulary; EOD is its eos."""

    name = "GPTSentencePieceTokenizer"

    def __init__(self, model_file: str | None) -> None:
        self._sp = _load(model_file, self.name)
        self._eod = self._sp.eos_id()
        if self._eod < 0:
            raise UsageError(
                f"--tokenizer-model {model_file} has no end-of-sentence piece (eos_id is "
                f"{self._eod}); GPTSentencePieceTokenizer uses it as EOD: train the model "
                "with an eos piece or use --tokenizer-type SentencePieceTokenizer"
            )

    @property
    def vocab_size(self) -> int:
        return len(self._sp)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        pad_id = self._sp.pad_id()
        return pad_id if pad_id >= 0 else self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode_as_ids(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode_as_ids(list(texts))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode_ids([int(i) for i in ids])
