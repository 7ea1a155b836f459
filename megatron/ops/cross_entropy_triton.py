"""Fused cross-entropy kernels for the chunked output layer (``--cross-entropy-loss-fusion``).

The chunked loss (:mod:`megatron.model.loss`) otherwise makes an fp32 copy of each chunk's
logits and runs several reductions over it in forward, and in backward writes an fp32
softmax, subtracts the one-hot target, scales and casts back: about ten passes over a
``[chunk, vocab]`` tensor. Here each is one pass over the logits in their own dtype:

* :func:`cross_entropy_forward`: per row, the log-sum-exp (online max and sum, fp32) and the
  loss ``lse - logit[label]``;
* :func:`cross_entropy_backward_`: per row, ``(softmax - onehot) * grad`` written over the
  logits in place, from the saved log-sum-exp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # vocabulary entries per step of a row's loop
_FAR: tl.constexpr = tl.constexpr(-1.0e30)  # for -inf: masked lanes stay finite (no inf - inf)


# fmt: off
@triton.jit
def _ce_fwd_kernel(LOGITS, stride_row, LABELS, LSE, LOSS, V: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m = tl.full([BLOCK], _FAR, dtype=tl.float32)  # running max per lane
    s = tl.zeros([BLOCK], dtype=tl.float32)  # running sum of exp(x - m) per lane
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
        x = tl.where(offs < V, x, _FAR)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    label = tl.load(LABELS + row).to(tl.int64)
    target = tl.load(base + label).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, lse - target)


@triton.jit
def _ce_bwd_kernel(LOGITS, stride_row, LABELS, LSE, GRAD, V: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    lse = tl.load(LSE + row)
    g = tl.load(GRAD + row).to(tl.float32)
    label = tl.load(LABELS + row).to(tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(offs == label, p - 1.0, p)
        tl.store(base + offs, (p * g).to(LOGITS.dtype.element_ty), mask=mask)
# fmt: on


def _check(logits_nv: torch.Tensor, labels_n: torch.Tensor) -> None:
    if logits_nv.dim() != 2 or logits_nv.stride(1) != 1:
        raise ValueError(f"logits must be [n, vocab] with a dense last dim, got {logits_nv.shape}")
    if labels_n.shape != logits_nv.shape[:1]:
        raise ValueError(f"labels {tuple(labels_n.shape)} do not match logits {logits_nv.shape}")


def cross_entropy_forward(
    logits_nv: torch.Tensor, labels_n: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, per-row log-sum-exp), both fp32 [n], of ``logits_nv`` [n, vocab].

    ``labels_n`` must be valid indices (< vocab; no ignore index: the loss mask does that
    job here). Checking them would cost a host sync, so it is not done."""
    _check(logits_nv, labels_n)
    n, vocab = logits_nv.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits_nv.device)
    loss = torch.empty_like(lse)
    if n:
        _ce_fwd_kernel[(n,)](
            logits_nv, logits_nv.stride(0), labels_n.contiguous(), lse, loss, V=vocab,
            BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8,
        )  # fmt: skip
    return loss, lse


def cross_entropy_backward_(
    logits_nv: torch.Tensor, labels_n: torch.Tensor, lse_n: torch.Tensor, grad_n: torch.Tensor
) -> torch.Tensor:
    """Overwrite ``logits_nv`` with d(loss)/d(logits) = (softmax - onehot) * ``grad_n``[:, None],
    in the logits' dtype; returns it."""
    _check(logits_nv, labels_n)
    n, vocab = logits_nv.shape
    if n:
        _ce_bwd_kernel[(n,)](
            logits_nv, logits_nv.stride(0), labels_n.contiguous(), lse_n.contiguous(),
            grad_n.contiguous(), V=vocab, BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
            num_warps=8,
        )  # fmt: skip
    return logits_nv
