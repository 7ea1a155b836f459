#!/usr/bin/env python
"""Train a small SentencePiece BPE model for the quickstart (a couple of seconds).

The model keeps sentencepiece's default special ids (unk 0, bos 1, eos 2): the eos piece
is the end-of-document token of ``--tokenizer-type GPTSentencePieceTokenizer``. Byte
fallback lets any character be encoded.

Example::

    python examples_seq_parallel/train_sentencepiece.py --input work/docstrings.txt \\
        --model-prefix work/spm --vocab-size 3000
"""

from __future__ import annotations

import argparse
import os
import sys


def train(input_file: str, model_prefix: str, vocab_size: int, threads: int) -> str:
    """Train and return the path of the ``.model`` file."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        input=input_file,
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        num_threads=threads,
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary, not an error
        minloglevel=2,
    )
    return model_prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="plain text, one sentence/document a line")
    parser.add_argument("--model-prefix", required=True, help="writes <prefix>.model and .vocab")
    parser.add_argument("--vocab-size", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"error: --input {args.input}: no such file", file=sys.stderr)
        return 2
    if args.vocab_size < 300:
        print(
            f"error: --vocab-size {args.vocab_size}: use at least 300 (byte fallback takes 256)",
            file=sys.stderr,
        )
        return 2
    path = train(args.input, args.model_prefix, args.vocab_size, args.threads)
    print(f"wrote {path} (vocabulary {args.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
