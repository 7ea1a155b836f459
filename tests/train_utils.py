"""Tiny training runs for tests: one command line, many layouts."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

TINY_TRAIN = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64 --max-position-embeddings 64 "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 10 --lr 1e-3 --min-lr 1e-4 "
    "--lr-decay-style cosine --lr-warmup-iters 2 --log-interval 1 --eval-interval 0 --eval-iters 0 "
    "--hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 120 "
    "--seed 7 --device cpu --num-workers 0 --weight-decay 0.1 --clip-grad 1.0"
)


def run_training(extra: str = "", base: str = TINY_TRAIN, callbacks: Sequence = ()) -> list[float]:
    """Run pretrain_gpt in this (already initialised) process group; return its losses."""
    import pretrain_gpt

    return pretrain_gpt.main(shlex.split(base + " " + extra), callbacks)


def run_many(runs: list[str]) -> list[list[float]]:
    return [run_training(extra) for extra in runs]
