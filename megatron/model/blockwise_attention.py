"""Causal attention over a long sequence as square blocks, one fused-kernel call per block.

cuDNN's causal attention forward runs slower per FLOP as the sequence grows (one H200, 8
heads x 128: 632 TFLOP/s at 64K, 520 at 256K; docs/performance.md). The forward here cuts
the sequence into blocks of ``block`` tokens and calls the kernel on every (query block, key
block) pair on or below the diagonal (causal on the diagonal, unmasked below it), which keeps
each call at the shorter sequence's rate, and merges the pairs' outputs through their
log-sum-exps. The backward is one call of the kernel's backward over the whole sequence with
the merged output and log-sum-exp: the gradients of a single forward call, and that
backward does not slow down with the length.

CUDA uses cuDNN's SDPA operators, CPU the fused CPU kernel (for tests). No dropout, no
document mask, equal query and key/value heads: the caller falls back to one call otherwise.
"""

from __future__ import annotations

import torch


def _cudnn_fwd(q, k, v, causal: bool, scale: float):
    out, lse, cum_q, cum_k, _, _, seed, offset, _ = (
        torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
    )
    return out, lse, (seed, offset, cum_q, cum_k)  # what the backward call needs besides


def _cudnn_bwd(dout, q, k, v, out, lse, causal: bool, scale: float, extra):
    seed, offset, cum_q, cum_k = extra
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, q.shape[2], k.shape[2],
        0.0, causal, scale=scale,
    )  # fmt: skip


def _cpu_fwd(q, k, v, causal: bool, scale: float):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )
    return out, lse, None


def _cpu_bwd(dout, q, k, v, out, lse, causal: bool, scale: float, extra):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )


def _kernels(device: torch.device):
    return (_cudnn_fwd, _cudnn_bwd) if device.type == "cuda" else (_cpu_fwd, _cpu_bwd)


class _BlockwiseCausal(torch.autograd.Function):
    """q, k, v ``[b, h, s, d]`` (any strides, last dim contiguous); s a multiple of ``block``."""

    @staticmethod
    def forward(ctx, q_bhsd, k_bhsd, v_bhsd, block: int, scale: float):
        fwd, _ = _kernels(q_bhsd.device)
        n = q_bhsd.shape[2] // block
        blk = [slice(i * block, (i + 1) * block) for i in range(n)]
        acc_dtype = torch.promote_types(q_bhsd.dtype, torch.float32)
        out_bhsd = torch.empty_like(q_bhsd)  # keeps q's memory layout (e.g. [s, b, h, d])
        lses = []
        for i in range(n):
            q_i = q_bhsd[:, :, blk[i]]
            acc = lse = None  # running output and log-sum-exp of query block i
            for j in range(i + 1):
                o, l_ij, extra = fwd(q_i, k_bhsd[:, :, blk[j]], v_bhsd[:, :, blk[j]], i == j, scale)
                l4 = l_ij.reshape(*l_ij.shape[:3], 1).to(acc_dtype)  # [b, h, block, 1]
                if acc is None:
                    acc, lse = o.to(acc_dtype), l4
                else:
                    merged = torch.logaddexp(lse, l4)
                    acc = acc.mul_(torch.exp(lse - merged)).add_(o * torch.exp(l4 - merged))
                    lse = merged
            out_bhsd[:, :, blk[i]] = acc
            lses.append(lse.reshape(l_ij.shape).to(l_ij.dtype))
        # The whole sequence's log-sum-exp, as one kernel call would have returned it.
        lse_full = torch.cat(lses, dim=2)
        ctx.scale, ctx.extra = scale, extra
        ctx.save_for_backward(q_bhsd, k_bhsd, v_bhsd, out_bhsd, lse_full)
        return out_bhsd

    @staticmethod
    def backward(ctx, dout_bhsd):
        # One backward call over the whole sequence: with the merged output and log-sum-exp
        # it is exactly the single call's backward, and the kernel's backward does not slow
        # down with the length as its forward does.
        q, k, v, out, lse = ctx.saved_tensors
        _, bwd = _kernels(q.device)
        # cuDNN's backward (torch 2.11) returns wrong gradients for a dout laid out
        # [s, b, h, d], whatever b (megatron.ops.contiguous_grad); contiguous is right.
        dout_bhsd = dout_bhsd.contiguous()
        dq, dk, dv = bwd(dout_bhsd, q, k, v, out, lse, True, ctx.scale, ctx.extra)
        return dq, dk, dv, None, None


def blockwise_causal_usable(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, block: int) -> bool:
    """Whether ``blockwise_causal_attention`` applies: more than one block, equal heads."""
    s = q_bhsd.shape[2]
    return 0 < block < s and s % block == 0 and q_bhsd.shape[1] == k_bhsd.shape[1]


def blockwise_causal_attention(
    q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor, block: int, scale: float
) -> torch.Tensor:
    """Causal softmax attention ``[b, h, s, d]``, computed in ``block``-token square blocks."""
    return _BlockwiseCausal.apply(q_bhsd, k_bhsd, v_bhsd, block, scale)
