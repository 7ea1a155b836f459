"""Output layer + cross entropy without the whole sequence's fp32 logits, and the LM loss.

:func:`output_layer_cross_entropy` computes ``logits = hidden @ W^T`` (in the compute dtype:
autocast's under autocast, then fp32) and the per-token cross entropy in chunks of ``chunk_size`` tokens; backward
recomputes each chunk's logits and accumulates the gradients wrt the hidden states and W.
Peak memory is one chunk's logits instead of the local sequence's (32K tokens x 50K vocab
in fp32 is 6.4 GB). With ``fused`` (``--cross-entropy-loss-fusion``) the softmax work of a
chunk is one Triton pass in forward and one in backward over the compute-dtype logits
(:mod:`megatron.ops.cross_entropy_triton`) instead of fp32 copies and several reductions.

:func:`masked_lm_loss` is Megatron's normalisation: the mean over the micro-batch's valid
tokens of the WHOLE sequence (all SP ranks); the value is the same on every SP rank and each
rank's gradient covers its own tokens, so parameter gradients are SUMMED over SP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.comm import all_reduce_no_grad, all_reduce_sum_identity_grad
from megatron.model.matmul import addmm_fp32_, linear_compute_dtype
from megatron.ops import triton_kernels_can_run


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token losses [n] (fp32) of ``hidden`` [n, h] against ``labels`` [n].

    The logits matmul runs in ``compute_dtype`` in forward and in the recomputation of
    backward alike (autocast is not active in backward, so the dtype is explicit). ``fused``:
    the Triton kernels compute the losses (saving each row's log-sum-exp) and, in backward,
    the logit gradients in place.
    """

    @staticmethod
    def forward(ctx, hidden_nh, weight_vh, labels_n, chunk_size: int, compute_dtype, fused: bool):
        n = hidden_nh.shape[0]
        weight_c = weight_vh.to(compute_dtype)
        losses = torch.empty(n, dtype=torch.float32, device=hidden_nh.device)
        lse = torch.empty_like(losses) if fused else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = F.linear(hidden_nh[start:end].to(compute_dtype), weight_c)
            if fused:
                from megatron.ops.cross_entropy_triton import cross_entropy_forward

                losses[start:end], lse[start:end] = cross_entropy_forward(
                    logits, labels_n[start:end]
                )
                continue
            logits = logits.float()
            target = logits.gather(1, labels_n[start:end, None]).squeeze(1)
            losses[start:end] = torch.logsumexp(logits, dim=-1) - target
        ctx.save_for_backward(hidden_nh, weight_vh, labels_n, lse)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses_n):
        hidden_nh, weight_vh, labels_n, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = ctx.compute_dtype
        weight_c = weight_vh.to(dtype)
        n = hidden_nh.shape[0]
        grad_hidden = torch.empty_like(hidden_nh) if want_hidden else None
        # Accumulate the weight gradient in fp32 across chunks.
        grad_weight = (
            torch.zeros(weight_vh.shape, dtype=torch.float32, device=weight_vh.device)
            if want_weight
            else None
        )
        for start in range(0, n, ctx.chunk_size):
            end = min(start + ctx.chunk_size, n)
            hidden_c = hidden_nh[start:end].to(dtype)
            # d loss / d logits = softmax - onehot, times the incoming per-token gradient.
            logits = F.linear(hidden_c, weight_c)  # compute dtype; softmax reads it as fp32
            if lse is not None:
                from megatron.ops.cross_entropy_triton import cross_entropy_backward_

                grad_logits = cross_entropy_backward_(
                    logits, labels_n[start:end], lse[start:end], grad_losses_n[start:end].float()
                )
            else:
                grad_logits = torch.softmax(logits, dim=-1, dtype=torch.float32)
                del logits
                rows = torch.arange(end - start, device=grad_logits.device)
                grad_logits[rows, labels_n[start:end]] -= 1.0
                grad_logits *= grad_losses_n[start:end, None].float()
                grad_logits = grad_logits.to(dtype)
            if want_hidden:
                grad_hidden[start:end] = grad_logits @ weight_c
            if want_weight:
                addmm_fp32_(grad_weight, grad_logits.t(), hidden_c)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_vh.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def output_layer_cross_entropy(
    hidden_sbh: torch.Tensor,
    weight_vh: torch.Tensor,
    labels_bs: torch.Tensor,
    chunk_size: int,
    fused: bool = False,
) -> torch.Tensor:
    """Per-token fp32 losses [b, s] of the output layer ``weight_vh`` on ``hidden_sbh`` [s, b, h].

    ``chunk_size`` tokens at a time with recomputation in backward; 0 computes the whole
    local sequence's logits at once with plain autograd (same result). ``fused`` (chunked
    only) uses the Triton cross-entropy kernels where they can run (see
    :func:`megatron.ops.triton_kernels_can_run`), else the unfused chunked path.
    """
    s, b, h = hidden_sbh.shape
    labels_n = labels_bs.t().reshape(s * b)  # [s, b] order, like the hidden states
    hidden_nh = hidden_sbh.reshape(s * b, h)
    if chunk_size <= 0:
        logits = F.linear(hidden_nh, weight_vh).float()  # [s*b, V] fp32
        losses_n = F.cross_entropy(logits, labels_n, reduction="none")
    else:
        dtype = linear_compute_dtype(hidden_nh, weight_vh)
        fused = fused and triton_kernels_can_run(hidden_nh.device)
        losses_n = ChunkedCrossEntropy.apply(
            hidden_nh, weight_vh, labels_n, chunk_size, dtype, fused
        )
    return losses_n.view(s, b).t().contiguous()  # [b, s]


def masked_lm_loss(
    per_token_loss: torch.Tensor, loss_mask: torch.Tensor, sp_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Mean of ``per_token_loss`` [b, s/p] over the loss-mask tokens of all SP ranks.

    Numerator: forward sum over the SP group, identity backward (each rank's gradient stays
    its own tokens'). Denominator: a plain sum (no gradient), at least 1 so a micro-batch
    without any valid token gives 0 instead of NaN.
    """
    mask = loss_mask.to(torch.float32)
    numerator = all_reduce_sum_identity_grad((per_token_loss.float() * mask).sum(), sp_group)
    denominator = all_reduce_no_grad(mask.sum().detach(), sp_group)
    return numerator / denominator.clamp(min=1.0)
