#!/usr/bin/env python
"""Tokenize a JSONL corpus into Megatron indexed datasets (``<prefix>_<key>_document.bin/.idx``).

Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/vocab.json \\
        --merge-file gpt2/merges.txt --append-eod --workers 4

then train with ``--data-path data/corpus_text_document``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.errors import UsageError  # noqa: E402
from megatron.tokenizer import TOKENIZER_TYPES  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize JSONL (one JSON object per line, optionally .gz) into Megatron's "
        "memory-mapped indexed dataset format for --data-path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input", required=True, help="JSONL file to tokenize; gzip-compressed input is detected"
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to tokenize; each gets its own output <prefix>_<key>_document. A value is a "
        "string, or a list of strings stored as one sequence each within the document",
    )
    group.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip and count lines that are not a JSON object instead of stopping at the first",
    )
    group.add_argument(
        "--keep-newlines",
        action="store_true",
        help="accepted for compatibility with Megatron's tool, where it only matters when "
        "splitting sentences; this tool does not split sentences and always keeps the text's "
        "newlines",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument(
        "--tokenizer-type", required=True, choices=TOKENIZER_TYPES, help="tokenizer to use"
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model file, or a local tokenizer.json / saved tokenizer directory "
        "(HFTokenizer)",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="NullTokenizer: ids are 0..vocab-size-1 and EOD is vocab-size",
    )
    group.add_argument(
        "--append-eod",
        action="store_true",
        help="append the end-of-document token to every document (counted in its size)",
    )
    group = parser.add_argument_group("output")
    group.add_argument(
        "--output-prefix",
        required=True,
        help="path prefix of the outputs: <prefix>_<key>_document.bin and .idx",
    )
    group.add_argument(
        "--dataset-impl",
        default="mmap",
        help="output format, as Megatron-DeepSpeed's tool spells it: mmap, the only format "
        "written (lazy and cached are refused)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=1, help="tokenizing processes (in total, over partitions)"
    )
    group.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="cut the input into this many contiguous parts processed at once (workers are "
        "shared among them), then merged in order into one output",
    )
    group.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="log progress (documents, MB/s, ETA) every this many documents",
    )
    args = parser.parse_args(argv)
    for flag, value in (
        ("--workers", args.workers),
        ("--partitions", args.partitions),
        ("--log-interval", args.log_interval),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1 (got {value})")
    if args.dataset_impl != "mmap":
        raise UsageError(
            f"--dataset-impl {args.dataset_impl}: only the mmap format is written (it is what "
            "--data-path reads); use --dataset-impl mmap or drop the flag"
        )
    if not os.path.isfile(args.input):
        raise UsageError(f"--input {args.input}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    # One worker = one core: keep HF tokenizers from spreading a batch over every core.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        args = get_args(argv)
        from megatron.data.preprocess import run_preprocess

        run_preprocess(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
