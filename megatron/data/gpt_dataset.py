"""GPT pretraining datasets: fixed-length samples cut from documents laid end to end.

``GPTDataset`` follows Megatron: documents of the split are shuffled (epochs as needed to
reach the requested sample count), concatenated, and cut into samples of ``seq_length + 1``
tokens that cross document boundaries (consecutive samples share one token: the last label
of one is the first input of the next), then the sample order is shuffled. Three index maps
(``doc_idx``, ``sample_idx``, ``shuffle_idx``) describe this and are cached on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np
import torch

from megatron.data import helpers
from megatron.data.index_cache import cached_arrays
from megatron.data.indexed_dataset import MMapIndexedDataset, index_file_path
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


def __getattr__(name: str) -> Any:
    # Megatron's pretrain_gpt.py imports the entry point from here; it lives in builder.py
    # (which imports this module), so it is resolved lazily.
    if name == "build_train_valid_test_datasets":
        from megatron.data.builder import build_train_valid_test_datasets

        return build_train_valid_test_datasets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
