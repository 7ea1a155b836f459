"""Parsing of ``--split`` and ``--data-path`` blends, Megatron's semantics."""

from __future__ import annotations

import math
from collections.abc import Sequence

from megatron.errors import UsageError

# Megatron asks each blended dataset for a little more than its share, so rounding in the
# greedy blend never runs past the end of a component.
BLEND_OVERSAMPLE = 1.005


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` (or ``"98/2/0"``, or ``"1"``) as three fractions summing to 1.

    Missing parts are 0 (so ``"1"`` puts everything in train).
    """
    text = str(split).strip()
    sep = "," if "," in text else "/"
    try:
        parts = [float(p) for p in text.split(sep)]
    except ValueError:
        raise UsageError(
            f"--split {split!r}: expected up to three numbers like '949,50,1'"
        ) from None
    if any(p < 0 or math.isnan(p) for p in parts):
        raise UsageError(f"--split {split!r}: the parts must not be negative")
    parts = (parts + [0.0, 0.0, 0.0])[:3]
    total = sum(parts)
    if not total > 0:
        raise UsageError(f"--split {split!r}: the parts must sum to more than 0")
    return [p / total for p in parts]


def split_boundaries(split: str, size: int) -> list[int]:
    """Document boundaries ``[0, end_train, end_valid, size]`` of ``size`` documents.

    Each part is rounded, then every boundary is shifted by the rounding excess so the last
    one is ``size`` (Megatron's ``get_train_valid_test_split_``).
    """
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * float(size))))
    excess = bounds[-1] - size
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def parse_blend(paths: Sequence[str] | str, flag: str) -> tuple[list[str], list[float]]:
    """``['0.3', 'A', '0.7', 'B']`` (or ``['A']``) as prefixes and weights summing to 1."""
    items = paths.split() if isinstance(paths, str) else [str(p) for p in paths]
    if not items:
        raise UsageError(f"{flag} is empty; give a dataset prefix or 'weight prefix' pairs")
    if len(items) == 1:
        return [items[0]], [1.0]
    if len(items) % 2:
        raise UsageError(
            f"{flag} {' '.join(items)}: expected one prefix or 'weight prefix' pairs "
            "(e.g. 0.3 dataA_text_document 0.7 dataB_text_document)"
        )
    weights, prefixes = [], []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            value = float(weight)
        except ValueError:
            raise UsageError(
                f"{flag}: {weight!r} is not a weight; expected 'weight prefix' pairs"
            ) from None
        if not value >= 0 or math.isinf(value):
            raise UsageError(f"{flag}: weight {weight} of {prefix} must be a finite number >= 0")
        weights.append(value)
        prefixes.append(prefix.strip())
    total = sum(weights)
    if total <= 0:
        raise UsageError(f"{flag}: the weights must sum to more than 0")
    return prefixes, [w / total for w in weights]


def blend_num_samples(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples to request from each blended dataset for ``num_samples`` in the blend."""
    return [int(math.ceil(num_samples * w * BLEND_OVERSAMPLE)) for w in weights]
