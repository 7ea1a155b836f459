"""``build_train_valid_test_datasets``: the datasets pretrain_gpt.py trains on, from args.

This is the only place that reads ``args``; the dataset classes take explicit parameters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.dataset_utils import blend_num_samples, parse_blend, split_boundaries
from megatron.data.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.data.index_cache import cached_arrays
from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path
from megatron.errors import UsageError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
Datasets = tuple[
    torch.utils.data.Dataset | None,
    torch.utils.data.Dataset | None,
    torch.utils.data.Dataset | None,
]


def default_cache_dir(prefix: str) -> str:
    """``index-cache`` beside the dataset files."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def open_dataset(prefix: str, flag: str) -> MMapIndexedDataset:
    """The indexed dataset at ``prefix``, or a UsageError naming ``flag`` if it is absent."""
    for path in (index_file_path(prefix), data_file_path(prefix)):
        if not os.path.isfile(path):
            raise UsageError(
                f"{flag} {prefix}: {path} not found; a prefix names the <prefix>.bin/.idx pair "
                "written by tools/preprocess_data.py (e.g. my-corpus_text_document)"
            )
    return MMapIndexedDataset(prefix)


class _Config:
    """The args fields the builders need, read once (and the tokenizer's vocabulary size)."""

    def __init__(self, args: Any, vocab_size: int | None = None) -> None:
        self.seq_length = int(args.seq_length)
        self.seed = int(args.seed)
        self.data_cache_path = getattr(args, "data_cache_path", None)
        self.vocab_size = vocab_size

    def cache_dir(self, prefix: str) -> str:
        return self.data_cache_path or default_cache_dir(prefix)


def _build_prefix(
    prefix: str,
    flag: str,
    split: str,
    num_samples: Sequence[int],
    cfg: _Config,
    names: Sequence[str] = SPLIT_NAMES,
) -> list[GPTDataset | None]:
    """Train/valid/test GPTDatasets of one prefix by ``split`` (None where a part is empty)."""
    indexed = open_dataset(prefix, flag)
    if len(indexed) == 0:
        raise UsageError(
            f"{flag} {prefix}: {index_file_path(prefix)} holds no documents; preprocess a "
            "non-empty corpus"
        )
    check_token_ids(indexed, cfg)
    bounds = split_boundaries(split, len(indexed))
    logger.info("%s: %d documents, split %s -> boundaries %s", prefix, len(indexed), split, bounds)
    out: list[GPTDataset | None] = []
    for i, name in enumerate(names):
        if bounds[i + 1] <= bounds[i]:
            out.append(None)
            continue
        documents = np.arange(bounds[i], bounds[i + 1], dtype=np.int64)
        out.append(
            GPTDataset(
                name,
                prefix,
                indexed,
                documents,
                int(num_samples[i]),
                cfg.seq_length,
                cfg.seed,
                cache_dir=cfg.cache_dir(prefix),
            )
        )
    return out


def token_id_range(indexed: MMapIndexedDataset, cache_dir: str | None) -> tuple[int, int]:
    """(smallest, largest) token id of a dataset: one pass over its data, then cached."""
    bin_path = data_file_path(indexed.path_prefix)
    stat = os.stat(bin_path)
    description = {
        "class": "TokenIdRange",
        "version": 1,
        "prefix": os.path.abspath(indexed.path_prefix),
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }

    def build() -> dict[str, np.ndarray]:
        tokens_n = indexed.all_tokens()
        return {"range": np.array([tokens_n.min(), tokens_n.max()], dtype=np.int64)}

    stem = f"{os.path.basename(indexed.path_prefix)}-tokens"
    low, high = cached_arrays(cache_dir, stem, description, ["range"], build)["range"].tolist()
    return int(low), int(high)


def check_token_ids(indexed: MMapIndexedDataset, cfg: _Config) -> None:
    """Every token id of the dataset is an id of the tokenizer's vocabulary."""
    if cfg.vocab_size is None or indexed.index.data_bytes == 0:
        return
    low, high = token_id_range(indexed, cfg.cache_dir(indexed.path_prefix))
    if low < 0 or high >= cfg.vocab_size:
        bad = f"largest token id {high}" if high >= cfg.vocab_size else f"token id {low}"
        raise UsageError(
            f"{data_file_path(indexed.path_prefix)}: {bad} is outside the tokenizer's vocabulary "
            f"of {cfg.vocab_size} ids; preprocess the data with the tokenizer you train with "
            "(--tokenizer-type, --vocab-size and its files)"
        )


def _build_blend(
    paths: Sequence[str] | str,
    flag: str,
    split: str,
    num_samples: Sequence[int],
    cfg: _Config,
    names: Sequence[str] = SPLIT_NAMES,
) -> list[torch.utils.data.Dataset | None]:
    """Train/valid/test datasets of a single prefix or a weighted blend of prefixes."""
    prefixes, weights = parse_blend(paths, flag)
    if len(prefixes) == 1:
        return _build_prefix(prefixes[0], flag, split, num_samples, cfg, names)
    per_prefix = [
        _build_prefix(
            prefix,
            flag,
            split,
            [blend_num_samples(weights, n)[k] for n in num_samples],
            cfg,
            names,
        )
        for k, prefix in enumerate(prefixes)
    ]
    out: list[torch.utils.data.Dataset | None] = []
    for i, name in enumerate(names):
        parts = [datasets[i] for datasets in per_prefix]
        if all(part is None for part in parts):
            out.append(None)
            continue
        empty = [p for p, part in zip(prefixes, parts) if part is None]
        if empty:
            raise UsageError(
                f"{flag}: {empty[0]} has no documents in the {name} split (--split {split}) "
                "while other blended prefixes do; change --split or the blend"
            )
        out.append(
            BlendableDataset(
                parts,
                weights,
                int(num_samples[i]),
                cache_dir=cfg.cache_dir(prefixes[0]),
                cache_key={"name": name, "parts": [p.cache_description for p in parts]},
            )
        )
    return out


def build_train_valid_test_datasets(
    args: Any, train_val_test_num_samples: Sequence[int], tokenizer: Any
) -> Datasets:
    """Train, valid and test datasets (None for a part with no data) from ``args``.

    Sources, in order: ``args.mock_data``; ``args.data_path`` (one prefix or
    ``weight prefix`` pairs, divided by ``args.split``); or ``args.train_data_path`` /
    ``valid_data_path`` / ``test_data_path`` (each a prefix or a blend, used whole).
    """
    num_samples = [int(n) for n in train_val_test_num_samples]
    if len(num_samples) != 3:
        raise ValueError("train_val_test_num_samples needs three numbers")
    cfg = _Config(args, getattr(tokenizer, "vocab_size", None))
    datasets = _build_all(args, num_samples, cfg, tokenizer)
    if num_samples[0] > 0 and datasets[0] is None:
        where = (
            f"--split {args.split} gives the train part no documents of --data-path"
            if getattr(args, "data_path", None)
            else "no --train-data-path was given"
        )
        raise UsageError(
            f"the train split is empty: {where}; give training data (e.g. --split 969,30,1)"
        )
    return datasets


def _build_all(args: Any, num_samples: list[int], cfg: _Config, tokenizer: Any) -> Datasets:
    """The three datasets of whichever source ``args`` names."""
    if getattr(args, "mock_data", False):
        return tuple(  # type: ignore[return-value]
            MockGPTDataset(n, cfg.seq_length, tokenizer.vocab_size, tokenizer.eod, cfg.seed, i)
            if n > 0
            else None
            for i, n in enumerate(num_samples)
        )
    separate = (
        getattr(args, "train_data_path", None),
        getattr(args, "valid_data_path", None),
        getattr(args, "test_data_path", None),
    )
    if getattr(args, "data_path", None):
        if any(separate):
            raise UsageError(
                "--data-path and --train-data-path/--valid-data-path/--test-data-path were "
                "both given; use --data-path with --split, or the three separate paths"
            )
        return tuple(_build_blend(args.data_path, "--data-path", args.split, num_samples, cfg))
    if any(separate):
        out: list[torch.utils.data.Dataset | None] = []
        for i, (paths, name) in enumerate(zip(separate, SPLIT_NAMES)):
            if not paths:
                out.append(None)
                continue
            # Split "1" puts every document of each prefix in the first (only) part.
            built = _build_blend(
                paths, f"--{name}-data-path", "1", [num_samples[i], 0, 0], cfg, (name, "", "")
            )
            out.append(built[0])
        return tuple(out)  # type: ignore[return-value]
    raise UsageError(
        "no training data: pass --data-path (a preprocessed prefix or 'weight prefix' pairs), "
        "--train-data-path/--valid-data-path/--test-data-path, or --mock-data"
    )
