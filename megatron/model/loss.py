"""Output layer + cross entropy without the whole sequence's fp32 logits, and the LM loss.

:func:`output_layer_cross_entropy` computes ``logits = hidden @ W^T`` (in the compute dtype:
autocast's under autocast, then fp32) and the per-token cross entropy in chunks of
``chunk_size`` tokens. Given the loss mask, the forward pass also computes the gradients of
the masked loss sum wrt the hidden states and W while each chunk's logits are at hand
(backward only scales them); without it backward recomputes each chunk's logits and
accumulates those gradients.
Peak memory is one chunk's logits instead of the local sequence's (32K tokens x 50K vocab
in fp32 is 6.4 GB). With ``fused`` (``--cross-entropy-loss-fusion``) the softmax work of a
chunk is one Triton pass in forward and one in backward over the compute-dtype logits
(:mod:`megatron.ops.cross_entropy_triton`) instead of fp32 copies and several reductions.

:func:`masked_lm_loss` is Megatron's normalisation: the mean over the micro-batch's valid
tokens of the WHOLE sequence (all SP ranks); the value is the same on every SP rank and each
rank's gradient covers its own tokens, so parameter gradients are SUMMED over SP ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.comm import all_reduce_no_grad, all_reduce_sum_identity_grad
from megatron.model.inplace_grad import add_to_grad_
from megatron.model.matmul import linear_compute_dtype, mm_fp32_into
from megatron.ops import triton_kernels_can_run


def _chunk_losses(logits_cv, labels_c, fused: bool):
    """(per-token losses, log-sum-exp or None) of one chunk's compute-dtype logits, fp32."""
    if fused:
        from megatron.ops.cross_entropy_triton import cross_entropy_forward

        return cross_entropy_forward(logits_cv, labels_c)
    logits_f = logits_cv.float()
    target = logits_f.gather(1, labels_c[:, None]).squeeze(1)
    return torch.logsumexp(logits_f, dim=-1) - target, None


def _chunk_logit_grad(logits_cv, labels_c, lse_c, grad_c, dtype) -> torch.Tensor:
    """d loss / d logits = (softmax - onehot) * ``grad_c``[:, None] in ``dtype``; the fused
    kernel (``lse_c`` given) overwrites ``logits_cv`` with it."""
    if lse_c is not None:
        from megatron.ops.cross_entropy_triton import cross_entropy_backward_

        return cross_entropy_backward_(logits_cv, labels_c, lse_c, grad_c.float())
    grad_logits = torch.softmax(logits_cv, dim=-1, dtype=torch.float32)
    rows = torch.arange(logits_cv.shape[0], device=grad_logits.device)
    grad_logits[rows, labels_c] -= 1.0
    grad_logits *= grad_c[:, None].float()
    return grad_logits.to(dtype)


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
            losses[start:end], lse_c = _chunk_losses(logits, labels_n[start:end], fused)
            if fused:
                lse[start:end] = lse_c
        ctx.save_for_backward(hidden_nh, weight_vh, labels_n, lse)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses_n):
        hidden_nh, weight_vh, labels_n, lse = ctx.saved_tensors
        grad_hidden, grad_weight = _chunked_grads(
            hidden_nh,
            weight_vh,
            labels_n,
            lse,
            grad_losses_n,
            ctx.chunk_size,
            ctx.compute_dtype,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            recompute=True,
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_vh.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunked_grads(
    hidden_nh,
    weight_vh,
    labels_n,
    lse_n,
    grad_n,
    chunk_size,
    dtype,
    want_hidden,
    want_weight,
    recompute: bool,
    losses_out=None,
    fused: bool = False,
):
    """Gradients wrt the hidden states and W (fp32) of sum(grad_n * loss), chunk by chunk.

    ``recompute``: each chunk's logits are recomputed and ``lse_n`` holds the fused forward's
    log-sum-exp (or None). Otherwise this IS the forward: each chunk's losses go to
    ``losses_out`` (with the fused kernels when ``fused``) before its logit gradient."""
    weight_c = weight_vh.to(dtype)
    grad_hidden = None
    if want_hidden:  # in forward fp32, so that backward's scaling rounds only once
        grad_hidden = torch.empty_like(hidden_nh, dtype=None if recompute else torch.float32)
    # The weight gradient accumulates in fp32 across chunks (the first chunk's GEMM writes it).
    grad_weight = (
        torch.empty(weight_vh.shape, dtype=torch.float32, device=weight_vh.device)
        if want_weight
        else None
    )
    for start in range(0, hidden_nh.shape[0], chunk_size):
        end = min(start + chunk_size, hidden_nh.shape[0])
        hidden_c, labels_c = hidden_nh[start:end].to(dtype), labels_n[start:end]
        logits = F.linear(hidden_c, weight_c)  # compute dtype; the softmax reads it as fp32
        lse_c = None if lse_n is None else lse_n[start:end]
        if not recompute:
            losses_out[start:end], lse_c = _chunk_losses(logits, labels_c, fused)
            if not (want_hidden or want_weight):  # evaluation: the losses alone
                continue
        grad_logits = _chunk_logit_grad(logits, labels_c, lse_c, grad_n[start:end], dtype)
        del logits
        if want_hidden and recompute:
            grad_hidden[start:end] = grad_logits @ weight_c
        elif want_hidden:  # fp32 rows, written by the GEMM
            mm_fp32_into(grad_hidden[start:end], grad_logits, weight_c, accumulate=False)
        if want_weight:
            mm_fp32_into(grad_weight, grad_logits.t(), hidden_c, accumulate=start > 0)
    if grad_weight is not None and hidden_nh.shape[0] == 0:  # no chunk wrote it
        grad_weight.zero_()
    return grad_hidden, grad_weight


class ChunkedMaskedCrossEntropySum(torch.autograd.Function):
    """``sum(loss * weights)`` (fp32 scalar) and the per-token losses [n] (no gradient).

    Because the output is a scalar, its gradients are those of the forward's own weights
    times one number: they are computed here, chunk by chunk while each chunk's logits are at
    hand, and backward only scales them. That saves the logits' recomputation (one of the
    output layer's four GEMMs per chunk in training) at the cost of holding the fp32 weight gradient from the
    loss to the start of backward, where the recomputing path allocates it anyway.
    """

    @staticmethod
    def forward(
        ctx,
        hidden_nh,
        weight_vh,
        labels_n,
        weights_n,
        chunk_size,
        compute_dtype,
        fused,
        want_hidden,
        want_weight,
        weight_grad_in_place,
    ):
        losses = torch.empty(hidden_nh.shape[0], dtype=torch.float32, device=hidden_nh.device)
        grad_hidden, grad_weight = _chunked_grads(
            hidden_nh,
            weight_vh,
            labels_n,
            None,
            weights_n,
            chunk_size,
            compute_dtype,
            want_hidden,
            want_weight,
            recompute=False,
            losses_out=losses,
            fused=fused,
        )
        ctx.grads = (grad_hidden, grad_weight)
        ctx.hidden_dtype, ctx.weight_dtype = hidden_nh.dtype, weight_vh.dtype
        ctx.weight = weight_vh if want_weight and weight_grad_in_place else None
        ctx.mark_non_differentiable(losses)
        return (losses * weights_n).sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss's backward can run only once (no retain_graph)")
        grad_hidden, grad_weight = ctx.grads
        weight, ctx.grads, ctx.weight = ctx.weight, None, None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_sum).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_sum)
            # Into .grad directly (the tied lookup's backward adds its rows there later):
            # no [vocab, h] sum of the two gradients for AccumulateGrad.
            if weight is not None and add_to_grad_(weight, grad_weight):
                grad_weight = None
            else:
                grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


class TokenLosses(NamedTuple):
    """The output layer's losses when the model is given the loss mask."""

    per_token: torch.Tensor  # [b, s/p] fp32, no gradient
    masked_sum: torch.Tensor  # scalar: sum(per_token * loss_mask), with its gradient


def output_layer_cross_entropy(
    hidden_sbh: torch.Tensor,
    weight_vh: torch.Tensor,
    labels_bs: torch.Tensor,
    chunk_size: int,
    fused: bool = False,
    loss_mask_bs: torch.Tensor | None = None,
    grad_in_forward: bool = True,
    weight_grad_in_place: bool = False,
) -> torch.Tensor | TokenLosses:
    """Per-token fp32 losses [b, s] of the output layer ``weight_vh`` on ``hidden_sbh`` [s, b, h].

    ``chunk_size`` tokens at a time; 0 computes the whole local sequence's logits at once
    with plain autograd (same result). ``fused`` (chunked only) uses the Triton cross-entropy
    kernels where they can run (see :func:`megatron.ops.triton_kernels_can_run`), else the
    unfused chunked path. With ``loss_mask_bs`` [b, s] the result is :class:`TokenLosses`
    and, chunked with ``grad_in_forward``, the gradients come out of the forward pass (no
    logits recomputation); otherwise backward recomputes each chunk's logits. Then, with
    ``weight_grad_in_place`` (for ``.backward()``), backward adds the weight's gradient into
    its ``.grad`` itself (:func:`megatron.model.inplace_grad.add_to_grad_`).
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
        if loss_mask_bs is not None and grad_in_forward:
            weights_n = loss_mask_bs.t().reshape(s * b).to(torch.float32)
            grad_on = torch.is_grad_enabled()
            masked_sum, losses_n = ChunkedMaskedCrossEntropySum.apply(
                hidden_nh,
                weight_vh,
                labels_n,
                weights_n,
                chunk_size,
                dtype,
                fused,
                grad_on and hidden_nh.requires_grad,
                grad_on and weight_vh.requires_grad,
                weight_grad_in_place,
            )
            return TokenLosses(losses_n.view(s, b).t().contiguous(), masked_sum)
        losses_n = ChunkedCrossEntropy.apply(
            hidden_nh, weight_vh, labels_n, chunk_size, dtype, fused
        )
    losses_bs = losses_n.view(s, b).t().contiguous()  # [b, s]
    if loss_mask_bs is None:
        return losses_bs
    masked_sum = (losses_bs * loss_mask_bs.to(torch.float32)).sum()
    return TokenLosses(losses_bs.detach(), masked_sum)


def masked_lm_loss(
    per_token_loss: torch.Tensor | TokenLosses,
    loss_mask: torch.Tensor,
    sp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Mean of ``per_token_loss`` [b, s/p] (or the model's :class:`TokenLosses`) over the
    loss-mask tokens of all SP ranks.

    Numerator: forward sum over the SP group, identity backward (each rank's gradient stays
    its own tokens'). Denominator: a plain sum (no gradient), at least 1 so a micro-batch
    without any valid token gives 0 instead of NaN.
    """
    mask = loss_mask.to(torch.float32)
    if isinstance(per_token_loss, TokenLosses):
        local_sum = per_token_loss.masked_sum
    else:
        local_sum = (per_token_loss.float() * mask).sum()
    numerator = all_reduce_sum_identity_grad(local_sum, sp_group)
    denominator = all_reduce_no_grad(mask.sum().detach(), sp_group)
    return numerator / denominator.clamp(min=1.0)
