"""GPT pretraining datasets: fixed-length samples cut from documents laid end to end.

``GPTDataset`` follows Megatron: documents of the split are shuffled (epochs as needed to
reach the requested sample count), concatenated, and cut into samples of ``seq_length + 1``
tokens that cross document boundaries (consecutive samples share one token: the last label
of one is the first input of the next), then the sample order is shuffled. Three index maps
(``doc_idx``, ``sample_idx``, ``shuffle_idx``) describe this and are cached on disk.

``build_train_valid_test_datasets`` (Megatron's entry point here) builds them, blended and
split, from the arguments: the only place that reads ``args``; the dataset classes take
explicit parameters.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data import helpers
from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.dataset_utils import blend_num_samples, parse_blend, split_boundaries
from megatron.data.index_cache import cached_arrays
from megatron.data.indexed_dataset import MMapIndexedDataset, data_file_path, index_file_path
from megatron.errors import UsageError

logger = logging.getLogger(__name__)

INDEX_MAP_VERSION = 1


class GPTDataset(torch.utils.data.Dataset):
    """Samples ``{"text": int64 [seq_length + 1]}`` from ``documents`` of ``indexed_dataset``.

    Args:
        name: split name (``train``/``valid``/``test``), used in cache file names.
        path_prefix: the dataset's prefix (identifies it in the cache key).
        indexed_dataset: the token store; each of its sequences is one document.
        documents: ids of the documents of this split.
        num_samples: samples requested; the dataset has at least this many (whole epochs).
        seq_length: tokens per sample for the model (each sample holds one more).
        seed: shuffling seed.
        cache_dir: where index maps are cached, or None to build them in memory.
    """

    def __init__(
        self,
        name: str,
        path_prefix: str,
        indexed_dataset: MMapIndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
    ) -> None:
        if seq_length < 1:
            raise UsageError(f"--seq-length must be at least 1 (got {seq_length})")
        documents = np.asarray(documents, dtype=np.int64)
        if documents.size == 0:
            raise ValueError(f"{name} split of {path_prefix} has no documents")
        if documents.min() < 0 or documents.max() >= len(indexed_dataset):
            raise ValueError(f"document ids out of range for {path_prefix}")
        self.name = name
        self.path_prefix = path_prefix
        self.indexed_dataset = indexed_dataset
        self.seq_length = int(seq_length)
        sizes = indexed_dataset.sizes
        tokens_per_epoch = int(np.sum(sizes[documents], dtype=np.int64))
        if tokens_per_epoch < 2:
            raise UsageError(
                f"{index_file_path(path_prefix)}: the {name} split has {tokens_per_epoch} "
                "tokens; a sample needs at least 2: use more data or another --split"
            )
        num_epochs = helpers.num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
        contiguous = bool(np.all(np.diff(documents) == 1))
        self.cache_description: dict[str, Any] = {
            "class": "GPTDataset",
            "version": INDEX_MAP_VERSION,
            "prefix": os.path.abspath(path_prefix),
            "name": name,
            "documents": (
                [int(documents[0]), int(documents[-1]) + 1]
                if contiguous
                else _documents_digest(documents)
            ),
            "num_documents": int(documents.size),
            "num_sequences": len(indexed_dataset),
            "tokens_per_epoch": tokens_per_epoch,
            "num_samples": int(num_samples),
            "seq_length": self.seq_length,
            "seed": int(seed),
        }

        def build() -> dict[str, np.ndarray]:
            return build_index_maps(
                sizes, documents, num_samples, seq_length, seed, tokens_per_epoch, num_epochs
            )

        stem = f"{os.path.basename(path_prefix)}-{name}"
        maps = cached_arrays(
            cache_dir, stem, self.cache_description, ["doc_idx", "sample_idx", "shuffle_idx"], build
        )
        self.doc_idx = maps["doc_idx"]
        self.sample_idx = maps["sample_idx"]
        self.shuffle_idx = maps["shuffle_idx"]
        if self.sample_idx.ndim != 2 or len(self.shuffle_idx) != len(self.sample_idx) - 1:
            raise UsageError(
                f"--data-cache-path {cache_dir}: index maps of {stem} are inconsistent; delete "
                "them and rerun"
            )
        logger.info(
            "%s split of %s: %d documents, %d epochs, %d samples of %d tokens",
            name,
            path_prefix,
            documents.size,
            num_epochs,
            len(self),
            seq_length,
        )

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {self.name} ({len(self)})")
        sample = int(self.shuffle_idx[idx])
        first_entry, first_offset = (int(v) for v in self.sample_idx[sample])
        last_entry, last_offset = (int(v) for v in self.sample_idx[sample + 1])
        ds = self.indexed_dataset
        if first_entry == last_entry:
            tokens = ds.get(
                int(self.doc_idx[first_entry]),
                offset=first_offset,
                length=last_offset - first_offset + 1,
            )
        else:
            parts = [ds.get(int(self.doc_idx[first_entry]), offset=first_offset)]
            for entry in range(first_entry + 1, last_entry):
                parts.append(ds.get(int(self.doc_idx[entry])))
            parts.append(ds.get(int(self.doc_idx[last_entry]), length=last_offset + 1))
            tokens = np.concatenate(parts)
        return {"text": tokens.astype(np.int64)}


def _documents_digest(documents: np.ndarray) -> str:
    """Hash of a non-contiguous document list, for cache keys."""
    return hashlib.md5(documents.tobytes(), usedforsecurity=False).hexdigest()


def build_index_maps(
    sizes: np.ndarray,
    documents: np.ndarray,
    num_samples: int,
    seq_length: int,
    seed: int,
    tokens_per_epoch: int,
    num_epochs: int,
) -> dict[str, np.ndarray]:
    """``doc_idx``, ``sample_idx`` and ``shuffle_idx`` with Megatron's order of random draws."""
    rng = np.random.RandomState(seed=seed)
    separate_last = helpers.separate_last_epoch(
        tokens_per_epoch, seq_length, num_samples, num_epochs
    )
    doc_idx = helpers.build_doc_idx(documents, num_epochs, rng, separate_last)
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, num_epochs * tokens_per_epoch)
    total = len(sample_idx) - 1
    if separate_last:
        shuffled_together = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    else:
        shuffled_together = total
    shuffle_idx = helpers.build_shuffle_idx(shuffled_together, total, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class MockGPTDataset(torch.utils.data.Dataset):
    """Synthetic samples for ``--mock-data``: random tokens with EOD every ~seq/2 tokens on
    average, a pure function of ``(seed, stream, index)`` so every rank and rerun sees the
    same (``stream`` tells splits apart)."""

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        eod: int,
        seed: int,
        stream: int = 0,
    ) -> None:
        if vocab_size < 2:
            raise ValueError("mock data needs a vocabulary of at least 2 tokens")
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.vocab_size = int(vocab_size)
        self.eod = int(eod)
        self.seed = int(seed)
        self.stream = int(stream)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if idx < 0:
            idx += self.num_samples
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for mock data ({self.num_samples})")
        rng = np.random.default_rng([self.seed, self.stream, idx])
        length = self.seq_length + 1
        tokens = rng.integers(0, self.vocab_size, size=length, dtype=np.int64)
        tokens[tokens == self.eod] = (self.eod + 1) % self.vocab_size
        ends = rng.random(length) < 2.0 / max(self.seq_length, 2)
        tokens[ends] = self.eod
        return {"text": tokens}


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
