"""Weighted blend of datasets (Megatron's BlendableDataset)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from megatron.data.helpers import build_blending_indices
from megatron.data.index_cache import cached_arrays

logger = logging.getLogger(__name__)


class BlendableDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Sample ``i`` is sample ``dataset_sample_index[i]`` of dataset ``dataset_index[i]``; the
    greedy assignment keeps every prefix of the blend within about one sample per dataset of
    the weights. With ``cache_dir`` the two index arrays are cached like the GPT index maps
    (``cache_key`` must then identify the components, e.g. their cache descriptions).
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        weights: Sequence[float],
        size: int,
        cache_dir: str | None = None,
        cache_key: dict[str, Any] | None = None,
    ) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset and at least one dataset")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = np.array([w / total for w in weights], dtype=np.float64)
        self.size = int(size)

        def build() -> dict[str, np.ndarray]:
            index, sample = build_blending_indices(self.weights.tolist(), self.size)
            return {"dataset_index": index, "dataset_sample_index": sample}

        description = {
            "class": "BlendableDataset",
            "version": 1,
            "weights": self.weights.tolist(),
            "size": self.size,
            "components": cache_key,
        }
        arrays = cached_arrays(
            cache_dir if cache_key is not None else None,
            "blend",
            description,
            ["dataset_index", "dataset_sample_index"],
            build,
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._check_bounds()

    def _check_bounds(self) -> None:
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                raise RuntimeError(
                    f"blend needs {int(count)} samples of dataset {d} but it has {len(dataset)}"
                )
        logger.info(
            "blend of %d datasets, %d samples, counts %s",
            len(self.datasets),
            self.size,
            counts.tolist(),
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if idx < 0:
            idx += self.size
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for a blend of {self.size}")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]
