"""Megatron's pretraining samplers and the data loader built on them.

Both samplers yield micro-batches of sample indices for one data-parallel rank and resume
exactly from ``consumed_samples`` (the global sample count already trained on). Under
sequence parallelism every rank of an SP group has the same data-parallel rank, so they all
load the same samples and each slices its part of the sequence (no broadcast).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from megatron.errors import UsageError


def _check(
    total_samples: int,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
) -> None:
    if total_samples <= 0:
        raise UsageError(f"the dataset has no samples (total_samples={total_samples})")
    if micro_batch_size <= 0:
        raise UsageError(f"--micro-batch-size must be positive (got {micro_batch_size})")
    if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data-parallel rank {data_parallel_rank} of {data_parallel_size}")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0 (got {consumed_samples})")


class MegatronPretrainingSampler:
    """Samples in order: step ``k`` covers global indices ``[k*M*D, (k+1)*M*D)`` from
    ``consumed_samples`` on, and rank ``r`` gets the ``r``-th run of ``M`` of them."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        _check(
            total_samples,
            consumed_samples,
            micro_batch_size,
            data_parallel_rank,
            data_parallel_size,
        )
        if consumed_samples >= total_samples:
            raise UsageError(
                f"no samples left: {consumed_samples} consumed of {total_samples}; train for "
                "fewer samples or use more data"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_times_data_parallel_size
        start = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        full_steps = (self.total_samples - self.consumed_samples) // step
        for k in range(full_steps):
            first = start + k * step
            yield list(range(first, first + self.micro_batch_size))
        if not self.drop_last:
            # Megatron's last partial global batch: this rank's part of what is left.
            tail = self.consumed_samples + full_steps * step
            first = tail + self.data_parallel_rank * self.micro_batch_size
            last = min(first + self.micro_batch_size, self.total_samples)
            if tail < self.total_samples and first < last:
                yield list(range(first, last))


class MegatronPretrainingRandomSampler:
    """Shuffled epochs for ``--dataloader-type cyclic`` (Megatron's random sampler).

    Each epoch draws a permutation seeded by the epoch number; with ``data_sharding`` every
    rank shuffles within its own contiguous bucket of the dataset. The epoch and position
    follow from ``consumed_samples``, which the sampler advances as it yields.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        data_sharding: bool = True,
    ) -> None:
        _check(
            total_samples,
            consumed_samples,
            micro_batch_size,
            data_parallel_rank,
            data_parallel_size,
        )
        self.dataset = dataset
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.data_sharding = data_sharding
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.last_batch_size = self.total_samples % self.micro_batch_times_data_parallel_size
        if self.total_samples < self.micro_batch_times_data_parallel_size:
            raise UsageError(
                f"the dataset has {total_samples} samples, fewer than one global micro-batch "
                f"({micro_batch_size} x {data_parallel_size} data-parallel ranks)"
            )

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[list[int]]:
        active_total = self.total_samples - self.last_batch_size
        self.epoch = self.consumed_samples // active_total
        current_epoch_samples = self.consumed_samples % active_total
        if current_epoch_samples % self.micro_batch_times_data_parallel_size:
            raise ValueError(
                f"consumed_samples {self.consumed_samples} is not a multiple of micro batch x "
                f"data-parallel size ({self.micro_batch_times_data_parallel_size})"
            )
        generator = torch.Generator()
        generator.manual_seed(self.epoch)
        if self.data_sharding:
            bucket_size = (
                self.total_samples // self.micro_batch_times_data_parallel_size
            ) * self.micro_batch_size
            bucket_offset = current_epoch_samples // self.data_parallel_size
            start = self.data_parallel_rank * bucket_size
            order = torch.randperm(bucket_size, generator=generator).numpy()
            indices = start + order[bucket_offset:]
        else:
            full_bucket = (self.total_samples // self.micro_batch_size) * self.micro_batch_size
            order = torch.randperm(full_bucket, generator=generator).numpy()
            indices = order[current_epoch_samples:][
                self.data_parallel_rank :: self.data_parallel_size
            ]
        mbs = self.micro_batch_size
        for k in range(len(indices) // mbs):
            self.consumed_samples += self.micro_batch_times_data_parallel_size
            yield indices[k * mbs : (k + 1) * mbs].tolist()


def collate_samples(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack each key of the sample dicts into one tensor, in the order given."""
    keys = samples[0].keys()
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in keys}


def build_pretraining_data_loader(
    dataset: torch.utils.data.Dataset | None,
    consumed_samples: int,
    args: Any,
    dp_rank: int,
    dp_size: int,
) -> torch.utils.data.DataLoader | None:
    """DataLoader over ``dataset`` for data-parallel rank ``dp_rank`` of ``dp_size``,
    resuming after ``consumed_samples``; ``args.dataloader_type`` picks the sampler."""
    if dataset is None:
        return None
    kind = getattr(args, "dataloader_type", "single") or "single"
    if kind == "single":
        sampler: Any = MegatronPretrainingSampler(
            len(dataset), consumed_samples, args.micro_batch_size, dp_rank, dp_size
        )
    elif kind == "cyclic":
        sampler = MegatronPretrainingRandomSampler(
            dataset, len(dataset), consumed_samples, args.micro_batch_size, dp_rank, dp_size
        )
    else:
        raise UsageError(f"--dataloader-type {kind}: unknown; choose single or cyclic")
    num_workers = int(args.num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Its own generator: starting the iterator must not draw from the global torch RNG,
        # whose state a resumed run restores exactly (dropout streams).
        generator=torch.Generator().manual_seed(int(getattr(args, "seed", 1234))),
    )
