"""Tokenizers loaded from local Hugging Face files (never downloaded from the hub)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron.errors import UsageError
from megatron.tokenizer.base import AbstractTokenizer

# Tried in order when only a bare tokenizer.json says nothing about its end-of-text token.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<EOD>")


def _token_text(token: object) -> str | None:
    """The text of a token entry in tokenizer_config.json (a string or an AddedToken dict)."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return None


class HFTokenizer(AbstractTokenizer):
    """A local ``tokenizer.json`` file, or a local directory holding a saved tokenizer.

    A directory with a ``tokenizer.json`` is read by the ``tokenizers`` library directly (its
    ``tokenizer_config.json`` names the EOS token, used as EOD); any other directory goes
    through ``transformers.AutoTokenizer`` with ``local_files_only=True``. Text is encoded
    with the tokenizer's own special-token post-processing (e.g. a BOS), like Megatron's
    HuggingFaceTokenizer.
    """

    name = "HFTokenizer"

    def __init__(self, path: str | None) -> None:
        if not path:
            raise UsageError(
                "--tokenizer-type HFTokenizer needs --tokenizer-model (a local tokenizer.json "
                "or a directory holding a saved tokenizer)"
            )
        if not os.path.exists(path):
            raise UsageError(
                f"--tokenizer-model {path}: no such file or directory; give a local "
                "tokenizer.json or a saved tokenizer directory (hub names are not downloaded)"
            )
        self._path = path
        self._fast = None  # tokenizers.Tokenizer
        self._auto = None  # transformers tokenizer
        json_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if os.path.isfile(json_file):
            self._load_json(json_file)
        else:
            self._load_auto(path)

    def _load_json(self, json_file: str) -> None:
        from tokenizers import Tokenizer

        try:
            self._fast = Tokenizer.from_file(json_file)
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise UsageError(
                f"--tokenizer-model {json_file} could not be loaded as a tokenizers JSON file "
                f"({exc})"
            ) from None
        self._vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        eos = self._eos_from_config(os.path.dirname(json_file))
        candidates = (eos,) if eos else _EOD_CANDIDATES
        for token in candidates:
            token_id = self._fast.token_to_id(token)
            if token_id is not None:
                self._eod = token_id
                break
        else:
            raise UsageError(
                f"--tokenizer-model {self._path}: cannot tell the end-of-document token "
                f"(looked for {', '.join(candidates)}); put tokenizer.json in a directory with "
                "a tokenizer_config.json that names eos_token"
            )
        self._pad = self._eod

    @staticmethod
    def _eos_from_config(directory: str) -> str | None:
        config = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(config):
            return None
        try:
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--tokenizer-model: cannot read {config} ({exc})") from None
        return _token_text(data.get("eos_token")) if isinstance(data, dict) else None

    def _load_auto(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._auto = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"--tokenizer-model {path} could not be loaded as a saved tokenizer ({exc})"
            ) from None
        self._vocab_size = len(self._auto)
        if self._auto.eos_token_id is None:
            raise UsageError(
                f"--tokenizer-model {path}: the tokenizer has no eos_token, which is used as "
                "the end-of-document token; set eos_token in its tokenizer_config.json"
            )
        self._eod = int(self._auto.eos_token_id)
        pad = self._auto.pad_token_id
        self._pad = int(pad) if pad is not None else self._eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def tokenize(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text).ids
        return list(self._auto(text)["input_ids"])

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [enc.ids for enc in self._fast.encode_batch(list(texts))]
        return [list(ids) for ids in self._auto(list(texts))["input_ids"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids)
