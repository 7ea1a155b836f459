"""Write a seeded JSONL corpus for preprocessing benchmarks (no download needed).

Words are drawn Zipf-like from the GPT-2 vocabulary shipped in tests/data, with punctuation,
numbers, non-ASCII text and paragraph breaks mixed in.

    python benchmarks/gen_corpus.py /tmp/corpus.jsonl 50   # about 50 MB
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

VOCAB = Path(__file__).resolve().parents[1] / "tests" / "data" / "gpt2" / "vocab.json"
EXTRAS = [",", ".", ";", "!", "?", "—", "“quoted”", "café", "naïve", "日本語", "😀", "2024", "3.14"]


def main(out: str, megabytes: float) -> None:
    vocab = json.loads(VOCAB.read_text(encoding="utf-8"))
    words = sorted({t[1:] for t in vocab if t.startswith("Ġ") and t[1:].isalpha()})
    rng = np.random.default_rng(0)
    rng.shuffle(words)
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    size = docs = 0
    with open(out, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            n = int(rng.integers(50, 2000))
            toks = list(rng.choice(words, size=n, p=weights))
            for i in rng.integers(0, n, size=n // 12):
                toks[i] += rng.choice(EXTRAS)
            for i in rng.integers(0, n, size=n // 150 + 1):
                toks[i] += "\n\n"
            line = json.dumps({"text": " ".join(toks)}) + "\n"
            f.write(line)
            size += len(line)
            docs += 1
    print(f"{docs} documents, {size} bytes -> {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the JSONL file to write")
    p.add_argument("megabytes", type=float, help="about this many MB of text")
    args = p.parse_args()
    main(args.out, args.megabytes)
