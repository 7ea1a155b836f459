"""Time GPTDataset's index maps (doc, sample and shuffle indices) for a large corpus.

python benchmarks/bench_index_maps.py --tokens 1e9 --documents 1e7 --seq-length 32768 --epochs 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.data.gpt_dataset import build_index_maps  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--documents", type=float, default=1e6)
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    n_docs = int(a.documents)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 2 * int(a.tokens) // n_docs, size=n_docs).astype(np.int32)
    tokens_per_epoch = int(sizes.sum())
    num_samples = (a.epochs * tokens_per_epoch - 1) // a.seq_length
    start = time.perf_counter()
    maps = build_index_maps(
        sizes,
        np.arange(n_docs, dtype=np.int32),
        num_samples,
        a.seq_length,
        a.seed,
        tokens_per_epoch,
        a.epochs,
    )
    took = time.perf_counter() - start
    print(
        f"{tokens_per_epoch / 1e9:.2f}B tokens, {n_docs} documents, seq {a.seq_length}, epochs {a.epochs}: {len(maps['shuffle_idx'])} samples in {took:.2f} s"
    )


if __name__ == "__main__":
    main()
