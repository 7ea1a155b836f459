"""DeepSpeed-Ulysses DistributedAttention.

Each rank holds a contiguous slice of the sequence and every head. One all-to-all turns
Q, K and V into "whole sequence, this rank's block of heads"; the local attention runs on
that; a second all-to-all turns the context back to "this rank's tokens, every head".
Which heads each rank gets is :func:`~megatron.core.sequence.heads.head_split`'s rule; where
ranks get different numbers of heads (e.g. 6 heads over 4 ranks: 2, 2, 1, 1) the all-to-alls
move blocks of different sizes (:class:`~megatron.core.comm.UnevenSeqToHead`), and the
fast paths that need equal blocks (head-group pipelining, the send-order projection) are off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron.core.comm import (
    FusedQKVSeqToHead,
    HeadToSeqAllToAll,
    RankMajorQKVSeqToHead,
    SeqToHeadAllToAll,
    UnevenHeadToSeq,
    UnevenSeqToHead,
    fused_qkv_source,
)
from megatron.core.sequence.heads import check_heads_for_sp, head_split, select_kv_heads

# check_heads_for_sp: imported from here by the start-up checks
__all__ = ["DistributedAttention", "check_heads_for_sp"]


class DistributedAttention(torch.nn.Module):
    """Ulysses attention around any local attention.

    Args:
        local_attention: called as ``local_attention(q, k, v, *args, **kwargs)`` on
            head-sharded tensors; returns a context with the heads (or heads*dim) at
            ``scatter_idx``.
        sequence_process_group: the SP group; ``None`` or size 1 makes this a pass-through.
        scatter_idx: head dimension (2 for both ``[s, b, h, d]`` and ``[b, s, h, d]``).
        gather_idx: sequence dimension (0 for ``[s, b, h, d]``, 1 for ``[b, s, h, d]``).
        output_backward_overlap, qkv_backward_overlap: work to launch while the backward
            all-to-all of the output (of Q, K, V) is in flight, e.g. deferred weight
            gradients (:mod:`megatron.model.deferred_wgrad`); even head splits only.
    """

    def __init__(
        self,
        local_attention: Callable[..., torch.Tensor],
        sequence_process_group: dist.ProcessGroup | None,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        output_backward_overlap: Callable[[], None] | None = None,
        qkv_backward_overlap: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.output_backward_overlap = output_backward_overlap
        self.qkv_backward_overlap = qkv_backward_overlap
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        sp = 1 if self.spg is None else dist.get_world_size(self.spg)
        if sp == 1:
            return self.local_attn(query, key, value, *args, **kwargs)
        head, seq = self.scatter_idx, self.gather_idx
        split = head_split(query.shape[head], key.shape[head], sp)
        key = select_kv_heads(key, split, head)
        value = select_kv_heads(value, split, head)
        if not split.even:
            return self._uneven(split, query, key, value, *args, **kwargs)
        # [s/p, b, h, d] -> [s, b, h/p, d] (shown for gather_idx 0), Q, K, V in one exchange
        qkv = fused_qkv_source(query, key, value, head)
        if qkv is not None:  # slices of one projection: the gradient goes to it directly
            q_full, k_full, v_full = FusedQKVSeqToHead.apply(
                self.spg,
                seq,
                head,
                self.qkv_backward_overlap,
                qkv,
                query.detach(),
                key.detach(),
                value.detach(),
            )
        else:
            q_full, k_full, v_full = SeqToHeadAllToAll.apply(
                self.spg, seq, head, self.qkv_backward_overlap, query, key, value
            )
        context = self.local_attn(q_full, k_full, v_full, *args, **kwargs)
        # [s, b, h/p, d] (or [s, b, h/p * d]) -> [s/p, b, h, d]
        (out,) = HeadToSeqAllToAll.apply(self.spg, seq, head, self.output_backward_overlap, context)
        return out

    def _uneven(self, split, query, key, value, *args, **kwargs):
        """The plain path for ranks with different numbers of heads: q/k/v ``[s/p, b, h, d]``
        -> ``[s, b, h_r, d]`` with rank r's ``h_r`` heads, and back (shown for gather_idx 0)."""
        head, seq = self.scatter_idx, self.gather_idx
        counts = (split.q_counts, split.kv_counts, split.kv_counts)
        q_full, k_full, v_full = UnevenSeqToHead.apply(
            self.spg, seq, head, counts, self.qkv_backward_overlap, query, key, value
        )
        context = self.local_attn(q_full, k_full, v_full, *args, **kwargs)
        (out,) = UnevenHeadToSeq.apply(
            self.spg, seq, head, (split.q_counts,), self.output_backward_overlap, context
        )
        return out

    def attend_rank_major(
        self, qkv_pnc: torch.Tensor, widths: tuple[int, int, int], head_dim: int, **kwargs
    ) -> torch.Tensor:
        """The same attention from a Q/K/V buffer in send order, ``[s, b, h, d]`` layouts only.

        ``qkv_pnc`` ``[p, s/p, b, c]``: block r holds rank r's q, k and v heads, ``widths``
        columns each (:mod:`megatron.model.rank_major_qkv`), so no copy packs the exchange.
        """
        if (self.gather_idx, self.scatter_idx) != (0, 2):
            raise ValueError("attend_rank_major: [s, b, h, d] layouts only")
        # [p, s/p, b, c] -> q, k, v [s, b, h_t/p, d], views of one receive buffer
        q_full, k_full, v_full = RankMajorQKVSeqToHead.apply(
            self.spg, widths, head_dim, self.qkv_backward_overlap, qkv_pnc
        )
        context = self.local_attn(q_full, k_full, v_full, **kwargs)
        # [s, b, h/p, d] -> [s/p, b, h, d]
        (out,) = HeadToSeqAllToAll.apply(self.spg, 0, 2, self.output_backward_overlap, context)
        return out
