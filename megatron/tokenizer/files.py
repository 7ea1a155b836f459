"""The tokenizer files a checkpoint carries, in ``iter_*/tokenizer/``.

A save copies the files that the tokenizer flags name into the checkpoint; loading
(``--use-checkpoint-args``, generation, export) reads them only from there or from flags on
its own command line, never from a path stored in ``meta.json``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

from megatron.errors import UsageError

logger = logging.getLogger("megatron")

TOKENIZER_DIR = "tokenizer"
FILE_ARGS = ("tokenizer_model", "vocab_file", "merge_file")
# Tokenizer files of a saved HF tokenizer (copied as they are).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_SENTENCEPIECE = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer")


def tokenizer_sources(args: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(source file, name in ``tokenizer/``) of every file the tokenizer flags in ``args`` name."""
    kind = args.get("tokenizer_type")
    if kind == "GPT2BPETokenizer":
        return [(args.get("vocab_file"), "vocab.json"), (args.get("merge_file"), "merges.txt")]
    if kind in _SENTENCEPIECE:
        return [(args.get("tokenizer_model"), "tokenizer.model")]
    src = args.get("tokenizer_model")
    if kind != "HFTokenizer" or not src:
        return []
    if not os.path.isdir(src):  # a tokenizer.json; its tokenizer_config.json names the EOS
        config = os.path.join(os.path.dirname(src), "tokenizer_config.json")
        return [(src, "tokenizer.json")] + (
            [(config, "tokenizer_config.json")] if os.path.isfile(config) else []
        )
    return [
        (os.path.join(src, n), n)
        for n in HF_TOKENIZER_FILES
        if os.path.isfile(os.path.join(src, n))
    ]


def copy_tokenizer_files(args: Mapping[str, Any], checkpoint: str) -> list[str]:
    """Copy the files the tokenizer flags name into ``checkpoint/tokenizer/``; their names."""
    sources = [(src, name) for src, name in tokenizer_sources(args) if src]
    if not sources:
        return []
    dest = os.path.join(checkpoint, TOKENIZER_DIR)
    os.makedirs(dest, exist_ok=True)
    for src, name in sources:
        shutil.copyfile(src, os.path.join(dest, name))
    return [name for _, name in sources]


def tokenizer_args_in(kind: str | None, directory: str) -> dict[str, str | None]:
    """The file flags of tokenizer ``kind`` for the files in ``directory`` as a save names them
    (None where there is no such file; symbolic links are refused)."""

    def inside(name: str) -> str | None:
        path = os.path.join(directory, name)
        if os.path.islink(path) or os.path.islink(directory):
            raise UsageError(
                f"{path}: a symbolic link; tokenizer files are read only from the checkpoint "
                "itself (or from flags)"
            )
        return path if os.path.isfile(path) else None

    if kind == "GPT2BPETokenizer":
        return {"vocab_file": inside("vocab.json"), "merge_file": inside("merges.txt")}
    if kind in _SENTENCEPIECE:
        return {"tokenizer_model": inside("tokenizer.model")}
    if kind == "HFTokenizer":
        found = [n for n in HF_TOKENIZER_FILES if inside(n)]
        return {"tokenizer_model": directory if found else None}
    return {}


def checkpoint_tokenizer_args(kind: str | None, checkpoint: str) -> dict[str, str | None]:
    """The file flags of tokenizer ``kind`` pointing into ``checkpoint/tokenizer/``."""
    return tokenizer_args_in(kind, os.path.join(checkpoint, TOKENIZER_DIR))


def use_checkpoint_tokenizer(args: Any, saved: Mapping[str, Any], checkpoint: str) -> None:
    """--use-checkpoint-args: the checkpoint's tokenizer, unless the command line names one.

    With ``--tokenizer-type`` given, the tokenizer comes from the command line alone. Without
    it, the type and ``--vocab-size`` come from ``meta.json`` and each file from the command
    line if given, else from ``checkpoint/tokenizer/``.
    """
    if args.tokenizer_type is not None:
        return
    args.tokenizer_type = saved.get("tokenizer_type")
    if args.vocab_size is None:
        args.vocab_size = saved.get("vocab_size")
    for key, path in checkpoint_tokenizer_args(args.tokenizer_type, checkpoint).items():
        if getattr(args, key) is not None:
            continue
        if path is None:
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{os.path.join(checkpoint, TOKENIZER_DIR)}: the checkpoint carries no "
                f"{args.tokenizer_type} files (saved by an older version?); pass {flag}"
            )
        setattr(args, key, path)
