"""How Ulysses splits attention heads over the ``p`` ranks of a sequence-parallel group.

Query heads: rank r receives a contiguous block; with ``h`` heads the first ``h % p`` ranks
get ``ceil(h/p)`` heads and the others ``floor(h/p)`` (DeepSpeed's uneven-heads order), so
``h = 6`` over 4 ranks gives 2, 2, 1, 1. At least one head per rank: ``p <= h``.

K/V heads (GQA, ``h_kv`` divides ``h``, group ``g = h / h_kv``): query head ``i`` attends with
K/V head ``i // g``. Rank r gets the distinct K/V heads its query heads need when they serve
its query heads in equal consecutive groups (the local attention's GQA rule: local query head
``j`` uses local K/V head ``j // (hq_r / hkv_r)``): a block of whole K/V heads (``p`` divides
``h_kv``), or one shared head (fewer K/V heads than ranks). Otherwise it gets one K/V head
per query head (a copy of each one's head). The copies' gradients sum back into the one head.

:func:`head_split` is the only place the split is written; the plain all-to-all
(:class:`~megatron.core.sequence.layer.DistributedAttention`) and the projection in send
order (:func:`megatron.model.rank_major_qkv.rank_major_rows`) both follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import torch

from megatron.errors import UsageError


def check_heads_for_sp(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """Raise a UsageError unless these head counts can be split over ``sp`` ranks."""
    if sp > num_heads:
        raise UsageError(
            f"--ds-sequence-parallel-size {sp} is larger than --num-attention-heads {num_heads}: "
            "every sequence-parallel rank needs at least one head; use at most "
            f"{num_heads} ranks"
        )
    if num_heads % num_kv_heads != 0:
        raise UsageError(
            f"--num-key-value-heads {num_kv_heads} does not divide --num-attention-heads {num_heads}"
        )


@dataclass(frozen=True)
class HeadSplit:
    """The heads of every rank of one SP group.

    ``q_counts[r]``: rank r's query heads (a contiguous block, in rank order);
    ``kv_heads[r]``: the K/V heads rank r attends with, in order (may repeat across ranks);
    ``kv_index``: all ranks' ``kv_heads`` concatenated, the K/V heads in send order.
    """

    q_counts: tuple[int, ...]
    kv_heads: tuple[tuple[int, ...], ...]
    num_kv_heads: int

    @cached_property
    def kv_counts(self) -> tuple[int, ...]:
        return tuple(len(heads) for heads in self.kv_heads)

    @cached_property
    def kv_index(self) -> tuple[int, ...]:
        return tuple(head for heads in self.kv_heads for head in heads)

    @cached_property
    def even(self) -> bool:
        """Every rank gets as many query heads, and as many K/V heads, as every other: the
        all-to-alls move equal blocks (the fast paths' layout)."""
        return len(set(self.q_counts)) == 1 and len(set(self.kv_counts)) == 1

    @cached_property
    def kv_replicated(self) -> bool:
        """The K/V heads in send order are not just the heads in order: some are copied."""
        return self.kv_index != tuple(range(self.num_kv_heads))


def _kv_heads_for(q_heads: range, group: int) -> tuple[int, ...]:
    """The K/V heads of a block of query heads (see the module docstring)."""
    need = [q // group for q in q_heads]
    distinct = sorted(set(need))
    per_kv, rem = divmod(len(need), len(distinct))
    if rem == 0 and all(kv == distinct[j // per_kv] for j, kv in enumerate(need)):
        return tuple(distinct)
    return tuple(need)


@cache
def head_split(num_heads: int, num_kv_heads: int, sp: int) -> HeadSplit:
    """How ``num_heads`` query and ``num_kv_heads`` K/V heads split over ``sp`` ranks."""
    check_heads_for_sp(num_heads, num_kv_heads, sp)
    base, extra = divmod(num_heads, sp)
    q_counts = tuple(base + (1 if r < extra else 0) for r in range(sp))
    group = num_heads // num_kv_heads
    kv_heads, start = [], 0
    for count in q_counts:
        kv_heads.append(_kv_heads_for(range(start, start + count), group))
        start += count
    return HeadSplit(q_counts, tuple(kv_heads), num_kv_heads)


_KV_INDEX: dict[tuple, torch.Tensor] = {}  # (kv_index, device) -> the index on that device


def select_kv_heads(kv: torch.Tensor, split: HeadSplit, head_dim: int) -> torch.Tensor:
    """``kv`` with its heads in send order (``split.kv_index`` along ``head_dim``): unchanged
    when no head is copied. index_select's backward sums the copies' gradients."""
    if not split.kv_replicated:
        return kv
    key = (split.kv_index, kv.device)
    index = _KV_INDEX.get(key)
    if index is None:  # built once per device: no host-to-device copy per call
        index = _KV_INDEX[key] = torch.tensor(split.kv_index, device=kv.device)
    return kv.index_select(head_dim, index)
