"""A dataset written by tools/preprocess_data.py and one written byte-for-byte in Megatron's
format both train through pretrain_gpt (with SP 2, packed documents on)."""

import json
import math

import numpy as np
from dist_helper import get_world
from test_indexed_dataset import write_reference_dataset
from train_utils import TINY_TRAIN, run_training

REAL_DATA = (
    TINY_TRAIN.replace("--mock-data ", "") + " --split 90,10,0 --eval-interval 3 --eval-iters 1"
)
PACKED = (
    " --reset-position-ids --reset-attention-mask --eod-mask-loss --ds-sequence-parallel-size 2"
)


def _write_datasets(tmp, preprocess_data):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 120, size=int(n)).tolist() for n in rng.integers(5, 60, size=200)]
    with open(f"{tmp}/corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": " ".join(map(str, d))}) + "\n")
    code = preprocess_data.main(
        ["--input", f"{tmp}/corpus.jsonl", "--output-prefix", f"{tmp}/tool", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "120", "--append-eod", "--workers", "1"]
    )  # fmt: skip
    assert code in (0, None)
    # Megatron's own byte layout, EOD (= vocab size 120) appended to each document.
    write_reference_dataset(
        f"{tmp}/megatron_text_document", [d + [120] for d in docs], range(1, len(docs) + 1)
    )


def _train_both(tmp):
    import torch.distributed as dist

    from tools import preprocess_data

    if dist.get_rank() == 0:  # one writer; the other ranks wait for the files
        _write_datasets(tmp, preprocess_data)
    dist.barrier()
    out = {}
    for name, prefix in (
        ("tool", f"{tmp}/tool_text_document"),
        ("megatron", f"{tmp}/megatron_text_document"),
    ):
        out[name] = run_training(
            f"--train-iters 6 --data-path {prefix} --data-cache-path {tmp}/cache{PACKED}",
            base=REAL_DATA,
        )
    return out


def test_tool_and_megatron_format_datasets_train(tmp_path):
    results = get_world(2).run(_train_both, str(tmp_path))
    for per_rank in results:
        assert len(per_rank["tool"]) == 6 and all(math.isfinite(x) for x in per_rank["tool"])
        # Same tokens, same documents: the two files give the same training run.
        assert per_rank["tool"] == per_rank["megatron"]
