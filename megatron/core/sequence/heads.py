"""How Ulysses splits attention heads over the ``p`` ranks of a sequence-parallel group.

Rank r receives query heads ``[r h/p, (r+1) h/p)``. Its K/V heads are the block
``[r h_kv/p, (r+1) h_kv/p)`` when ``p`` divides ``h_kv``; with fewer K/V heads than ranks
(GQA/MQA) every query head of rank r shares one K/V head, ``r h_kv // p``, which the rank
gets a copy of. These two rules are the only place the split is written:
:func:`replicate_kv_heads` (the plain all-to-all) and
:func:`megatron.model.rank_major_qkv.rank_major_rows` (the projection in send order) both
follow :func:`kv_heads_of_rank`.
"""

from __future__ import annotations

import torch

from megatron.errors import UsageError


def check_heads_for_sp(num_heads: int, num_kv_heads: int, sp: int) -> None:
    """Raise a UsageError unless these head counts can be split over ``sp`` ranks."""
    if num_heads % sp != 0:
        raise UsageError(
            f"--num-attention-heads {num_heads} is not divisible by --ds-sequence-parallel-size {sp}: "
            "Ulysses gives every sequence-parallel rank the same number of heads; choose a "
            "sequence-parallel size that divides the head count"
        )
    if num_heads % num_kv_heads != 0:
        raise UsageError(
            f"--num-key-value-heads {num_kv_heads} does not divide --num-attention-heads {num_heads}"
        )
    if num_kv_heads % sp != 0 and sp % num_kv_heads != 0:
        raise UsageError(
            f"--num-key-value-heads {num_kv_heads} and --ds-sequence-parallel-size {sp}: one must "
            "divide the other so each rank receives whole key/value heads"
        )


def kv_heads_replicated(num_kv_heads: int, sp: int) -> bool:
    """Whether ranks share K/V heads (fewer K/V heads than ranks): each gets one copy."""
    return num_kv_heads % sp != 0


def kv_heads_of_rank(rank: int, num_kv_heads: int, sp: int) -> range:
    """The K/V heads rank ``rank`` of ``sp`` attends with (see the module docstring)."""
    if kv_heads_replicated(num_kv_heads, sp):
        head = rank * num_kv_heads // sp
        return range(head, head + 1)
    per_rank = num_kv_heads // sp
    return range(rank * per_rank, (rank + 1) * per_rank)


def replicate_kv_heads(kv: torch.Tensor, sp: int, head_dim: int) -> torch.Tensor:
    """``kv`` with rank r's K/V heads at block r of dimension ``head_dim``: unchanged when
    ``sp`` divides the K/V heads, else one copy of each rank's shared head
    (:func:`kv_heads_of_rank`). The copies' gradients sum back into the one head
    (index_select's backward)."""
    h_kv = kv.shape[head_dim]
    if not kv_heads_replicated(h_kv, sp):
        return kv
    # kv_heads_of_rank(r, h_kv, sp).start for every rank r, computed on kv's device
    index = torch.arange(sp, device=kv.device) * h_kv // sp
    return kv.index_select(head_dim, index)
