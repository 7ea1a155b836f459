"""Random seeds: python, numpy and torch (and CUDA), and each rank's dropout stream."""

from __future__ import annotations

import random

import numpy as np
import torch

from megatron.core.parallel_state import ParallelState


def set_random_seed(seed: int, rank_offset: int = 0) -> None:
    """Seed python, numpy and torch (and CUDA); ``rank_offset`` gives ranks their own streams."""
    s = seed + rank_offset
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def dropout_seed_offset(state: ParallelState) -> int:
    """Independent dropout streams for every rank that computes a different shard."""
    return 100 * state.pp_rank + 1009 * state.sdp_rank
