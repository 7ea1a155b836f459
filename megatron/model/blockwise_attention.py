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

``blockwise_step_attention`` is the general form over any backend's step, with documents and
GQA, forward and backward both by steps (the local half of ring attention).
"""

from __future__ import annotations

import torch

from megatron.model.attention_step import SDPA_STEP, merge_


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
                    merge_(acc_sbhd, lse_bhs, o_sbhd, l_bhs)  # in place
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


class _BlockwiseSteps(torch.autograd.Function):
    """Causal attention ``[s, b, h, d]`` (k/v: hkv heads) as steps of ``step`` over square
    blocks: every (query block, key block) pair on or below the diagonal, merged by
    log-sum-exp; the backward runs every pair's step backward from the merged output and
    log-sum-exp, as ring attention does with the K/V blocks of other ranks."""

    @staticmethod
    def forward(ctx, q_sbhd, k_sbhd, v_sbhd, step, block: int, scale: float, doc_ids):
        s = q_sbhd.shape[0]
        bounds = [(i, min(i + block, s)) for i in range(0, s, block)]
        outs, lses = [], []
        for qi, (q0, q1) in enumerate(bounds):
            acc = None
            for k0, k1 in bounds[: qi + 1]:
                o, lse = step(q_sbhd[q0:q1], k_sbhd[k0:k1], v_sbhd[k0:k1],
                              **_pair_kw(doc_ids, q0, q1, k0, k1, scale))  # fmt: skip
                acc = (o.to(lse.dtype), lse) if acc is None else merge_(*acc, o, lse)
            outs.append(acc[0])
            lses.append(acc[1])
        out_sbhd = torch.cat(outs).to(q_sbhd.dtype)
        lse_bhs = torch.cat(lses, dim=2)
        ctx.step, ctx.bounds, ctx.scale = step, bounds, scale
        ctx.save_for_backward(q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, doc_ids)
        return out_sbhd

    @staticmethod
    def backward(ctx, dout_sbhd):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
        for qi, (q0, q1) in enumerate(ctx.bounds):
            for k0, k1 in ctx.bounds[: qi + 1]:
                grads = ctx.step.backward(
                    dout_sbhd[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1],
                    lse[:, :, q0:q1], **_pair_kw(doc_ids, q0, q1, k0, k1, ctx.scale),
                )  # fmt: skip
                dq[q0:q1] += grads[0]
                dk[k0:k1] += grads[1]
                dv[k0:k1] += grads[2]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _pair_kw(doc_ids, q0: int, q1: int, k0: int, k1: int, scale: float) -> dict:
    docs = (
        {} if doc_ids is None else {"q_doc_ids": doc_ids[:, q0:q1], "k_doc_ids": doc_ids[:, k0:k1]}
    )
    return {"causal": "diagonal", "q_offset": q0, "k_offset": k0, "softmax_scale": scale, **docs}


def blockwise_step_attention(
    q_sbhd: torch.Tensor,
    k_sbhd: torch.Tensor,
    v_sbhd: torch.Tensor,
    step,
    block: int,
    scale: float,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention ``[s, b, hq, d]`` (packed documents by ``doc_ids`` ``[b, s]``) computed
    by an ``AttentionStep`` over ``block``-token blocks (any length; the last may be shorter).
    ``python -m megatron.validate`` runs a backend's step in the model through it."""
    return _BlockwiseSteps.apply(q_sbhd, k_sbhd, v_sbhd, step, block, scale, doc_ids)
