"""Gradients added straight into a parameter's ``.grad``.

The tied word embeddings are used twice per micro-batch, by the lookup and by the output
layer, so autograd sums their two gradients into a new ``[vocab, h]`` fp32 tensor before
adding it to ``.grad``; and an embedding lookup's backward builds a dense, zero-filled
gradient for a few thousand rows. Here the loss sets or adds its output-layer gradient into
``.grad`` itself, and on CUDA the lookup's backward adds its rows there in place (a
sort-based ``index_put_``, deterministic), so neither full-size temporary nor its passes
exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_to_grad_(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """``param.grad += grad`` (or ``param.grad = grad``, taking ``grad`` over) where ``param``
    is a leaf that takes ``grad`` as it is; False, and nothing done, where AccumulateGrad must
    handle it (another dtype or shape, a non-leaf, a gradient of another kind)."""
    if not (param.is_leaf and param.requires_grad):
        return False
    if grad.dtype != param.dtype or grad.shape != param.shape:
        return False
    current = param.grad
    if current is None:
        param.grad = grad
    elif type(current) is torch.Tensor and current.dtype == grad.dtype:
        current.add_(grad)
    else:
        return False
    return True


class _LookupAddingToGrad(torch.autograd.Function):
    """``weight[ids]``; on CUDA backward adds the rows' gradients into ``weight.grad`` when
    there is one (the loss's, or an earlier micro-batch's), else returns the dense gradient
    (which AccumulateGrad adds)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight, ctx.weight = ctx.weight, None
        grad = weight.grad
        # CUDA only: its index_put_ sorts (deterministic), CPU's is not deterministic.
        if type(grad) is torch.Tensor and grad.dtype == grad_out.dtype and grad.is_cuda:
            rows = grad_out.reshape(-1, grad_out.shape[-1])
            with torch.no_grad():
                grad.index_put_((ids.reshape(-1),), rows, accumulate=True)
            return None, None
        return None, torch.ops.aten.embedding_dense_backward(
            grad_out, ids, weight.shape[0], -1, False
        )


def embedding_lookup(ids: torch.Tensor, module: torch.nn.Embedding, in_place: bool) -> torch.Tensor:
    """``module(ids)``; ``in_place`` (a plain ``nn.Embedding``): its backward adds into
    ``.grad``."""
    weight = module.weight
    plain = module.padding_idx is None and module.max_norm is None and not module.sparse
    plain = plain and not module.scale_grad_by_freq
    in_place = in_place and torch.is_grad_enabled() and weight.requires_grad and weight.is_leaf
    if not (in_place and plain):
        return module(ids)
    return _LookupAddingToGrad.apply(ids, weight)
