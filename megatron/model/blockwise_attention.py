"""Causal attention over a long sequence as square blocks, one fused-kernel call per block.

cuDNN's causal attention forward runs slower per FLOP as the sequence grows (one H200, 8
heads x 128: 632 TFLOP/s at 64K, 520 at 256K; docs/performance.md). The forward here cuts
the sequence into blocks of ``block`` tokens and calls the kernel on every (query block, key
block) pair on or below the diagonal (causal on the diagonal, unmasked below it), which keeps
each call at the shorter sequence's rate, and merges the pairs' outputs through their
log-sum-exps. The backward is one call of the kernel's backward over the whole sequence with
the merged output and log-sum-exp: the gradients of a single forward call, and that
backward does not slow down with the length.

Each block is one step of the SDPA backend (megatron.model.attention_step: cuDNN on CUDA, the
fused CPU kernel on CPU, for tests), merged by its log-sum-exp merge. No dropout, no
document mask, equal query and key/value heads: the caller falls back to one call otherwise.
"""

from __future__ import annotations

import torch

from megatron.model.attention_step import SDPA_STEP, merge


def _sbhd(t_bhsd: torch.Tensor) -> torch.Tensor:
    """The [s, b, h, d] view of a [b, h, s, d] tensor (the step's layout; no copy)."""
    return t_bhsd.permute(2, 0, 1, 3)


class _BlockwiseCausal(torch.autograd.Function):
    """q, k, v ``[b, h, s, d]`` (any strides, last dim contiguous); s a multiple of ``block``."""

    @staticmethod
    def forward(ctx, q_bhsd, k_bhsd, v_bhsd, block: int, scale: float):
        q_sbhd, k_sbhd, v_sbhd = (_sbhd(t) for t in (q_bhsd, k_bhsd, v_bhsd))
        out_bhsd = torch.empty_like(q_bhsd)  # keeps q's memory layout (e.g. [s, b, h, d])
        lses = []
        for i in range(q_sbhd.shape[0] // block):
            q_i = q_sbhd[i * block : (i + 1) * block]
            acc_sbhd = lse_bhs = None  # running output and log-sum-exp of query block i
            for j in range(i + 1):
                kv_j = (t[j * block : (j + 1) * block] for t in (k_sbhd, v_sbhd))
                o_sbhd, l_bhs = SDPA_STEP(
                    q_i,
                    *kv_j,
                    causal="diagonal" if i == j else "none",
                    q_offset=i * block,
                    k_offset=j * block,
                    softmax_scale=scale,
                )
                if acc_sbhd is None:
                    acc_sbhd, lse_bhs = o_sbhd.to(l_bhs.dtype), l_bhs
                else:
                    acc_sbhd, lse_bhs = merge(acc_sbhd, lse_bhs, o_sbhd, l_bhs)
            out_bhsd[:, :, i * block : (i + 1) * block] = acc_sbhd.permute(1, 2, 0, 3)
            lses.append(lse_bhs)
        # The whole sequence's log-sum-exp [b, h, s], as one kernel call would have returned it.
        lse_full = torch.cat(lses, dim=2)
        ctx.scale = scale
        ctx.save_for_backward(q_bhsd, k_bhsd, v_bhsd, out_bhsd, lse_full)
        return out_bhsd

    @staticmethod
    def backward(ctx, dout_bhsd):
        # One backward call over the whole sequence: with the merged output and log-sum-exp
        # it is exactly the single call's backward, and the kernel's backward does not slow
        # down with the length as its forward does.
        q, k, v, out, lse = (_sbhd(t) if t.dim() == 4 else t for t in ctx.saved_tensors)
        dq, dk, dv = SDPA_STEP.backward(
            _sbhd(dout_bhsd), q, k, v, out, lse, causal="diagonal", softmax_scale=ctx.scale
        )
        return (*(g.permute(1, 2, 0, 3) for g in (dq, dk, dv)), None, None)


def blockwise_causal_usable(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, block: int) -> bool:
    """Whether ``blockwise_causal_attention`` applies: more than one block, equal heads."""
    s = q_bhsd.shape[2]
    return 0 < block < s and s % block == 0 and q_bhsd.shape[1] == k_bhsd.shape[1]


def blockwise_causal_attention(
    q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, block: int, scale: float
) -> torch.Tensor:
    """Causal softmax attention ``[b, h, s, d]``, computed in ``block``-token square blocks."""
    return _BlockwiseCausal.apply(q_bhsd, k_bhsd, v_bhsd, block, scale)
