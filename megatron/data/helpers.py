"""Index maps of GPT and blended datasets, in numpy (Megatron builds them in C++).

The results equal Megatron-LM's ``_build_doc_idx``, ``build_sample_idx`` (helpers.cpp),
``_build_shuffle_idx`` and ``build_blending_indices`` for the same inputs and seed, so a run
sees the same samples in the same order as Megatron would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give ``num_samples`` samples of ``seq_length + 1`` tokens
    (consecutive samples share one token), at least one."""
    # Samples from E epochs: (E * T - 1) // S, so E >= (N * S + 1) / T.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def separate_last_epoch(
    tokens_per_epoch: int, seq_length: int, num_samples: int, num_epochs: int
) -> bool:
    """Megatron's rule: shuffle the last epoch on its own when less than 80% of it is used,
    so the few samples needed from it are not spread over the whole run."""
    if num_epochs == 1:
        return False
    from_full_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - from_full_epochs
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    return last_epoch_samples < int(0.80 * samples_per_epoch)


def build_doc_idx(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool
) -> np.ndarray:
    """Document ids of ``num_epochs`` epochs in shuffled order, ``int32 [epochs * docs]``.

    The epochs are shuffled together, except a separate last epoch, shuffled on its own
    after the others (Megatron's order of random draws).
    """
    if not separate_last or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, tokens_total: int
) -> np.ndarray:
    """Start of every sample as (position in ``doc_idx``, token offset in that document).

    Sample ``i`` covers tokens ``i*S .. i*S + S`` (inclusive) of the documents laid end to
    end in ``doc_idx`` order, so row ``i + 1`` is where sample ``i`` ends. Returns
    ``[num_samples + 1, 2]`` with ``num_samples = (tokens_total - 1) // S``; int32 where
    it fits, else int64.
    """
    num_samples = (tokens_total - 1) // seq_length
    doc_lengths = sizes[doc_idx].astype(np.int64)  # [epochs * docs]
    doc_ends = np.cumsum(doc_lengths)  # exclusive end position of each entry
    if int(doc_ends[-1]) != tokens_total:
        raise ValueError(f"documents hold {int(doc_ends[-1])} tokens, expected {tokens_total}")
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length  # [n + 1]
    # The entry holding token p is the first whose end is past p (skips empty documents).
    entry = np.searchsorted(doc_ends, starts, side="right")
    offset = starts - (doc_ends[entry] - doc_lengths[entry])
    entry[0], offset[0] = 0, 0  # Megatron starts at (0, 0) even if document 0 is empty
    fits = max(len(doc_idx), int(offset.max(initial=0)) + 1) < 2**31
    out = np.empty((num_samples + 1, 2), dtype=np.int32 if fits else np.int64)
    out[:, 0] = entry
    out[:, 1] = offset
    return out


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of ``0..total_size-1``: the first ``num_samples`` shuffled among
    themselves, the rest (a separate last epoch) shuffled after them."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``size`` blended samples, which dataset and which sample of it.

    Greedy like Megatron: sample ``t`` goes to the dataset furthest behind its share,
    ``argmax_d(w_d * max(t, 1) - taken_d)`` (ties to the lower index), so every prefix of
    the blend tracks the weights to within about one sample per dataset.
    Returns ``(dataset_index uint8 [size], dataset_sample_index int64 [size])``.
    """
    weights = [float(w) for w in weights]
    if len(weights) > 255:
        raise ValueError("at most 255 datasets can be blended")
    dataset_index = np.empty(size, dtype=np.uint8)
    sample_index = np.empty(size, dtype=np.int64)
    taken = [0] * len(weights)
    order = range(len(weights))
    for t in range(size):
        scale = float(max(t, 1))
        best, best_error = 0, weights[0] * scale - taken[0]
        for d in order:
            error = weights[d] * scale - taken[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[t] = best
        sample_index[t] = taken[best]
        taken[best] += 1
    return dataset_index, sample_index
