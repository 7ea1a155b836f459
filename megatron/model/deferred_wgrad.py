"""Weight gradients computed later in backward, while an all-to-all is in flight
(``--delay-wgrad-compute``).

In a Ulysses layer's backward the all-to-alls are on the critical path: the gradient of the
attention output goes to the head-sharded layout before the local attention's backward, and
dQ/dK/dV come back before the QKV projection's. The weight-gradient GEMMs of the linears met
just before each exchange (the attention's output projection; the MLP's two projections)
feed nothing that follows, so :func:`linear` (the forward of :class:`DeferrableLinear`, whose
queue the parallelisation step sets) computes only the input and bias gradients when
autograd reaches it and queues the weight's; the all-to-all's backward starts its exchange,
runs the queue, then waits (see :mod:`megatron.core.comm`).

Same arithmetic as ``F.linear`` under autocast: the product in the compute dtype, the weight
gradient accumulated into ``weight.grad`` (so FSDP2 and the optimizer find it where they
look) in the weight's dtype as AccumulateGrad would, or in fp32 when the queue's
``fp32_grads`` is on: ZeRO 1 summing several micro-batches' gradients (Megatron's gradient
accumulation fusion). Then the GEMM writes and accumulates the fp32 gradient itself, and
FSDP2, which keeps a gradient already in its fp32 reduce dtype as it is, has no cast or add
to do per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megatron.model.matmul import addmm_fp32_, linear_compute_dtype, mm_fp32_into


class WgradQueue:
    """Weight-gradient computations waiting for an all-to-all to hide behind; FIFO."""

    def __init__(self) -> None:
        self._jobs: list[Callable[[], None]] = []
        self.fp32_grads = False  # low-precision weights get fp32 gradients (set_fp32_grads)

    def push(self, job: Callable[[], None]) -> None:
        self._jobs.append(job)

    def run(self) -> None:
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job()

    @property
    def pending(self) -> int:
        return len(self._jobs)


def set_fp32_grads(model: torch.nn.Module, on: bool) -> None:
    """Whether the deferred weight gradients of ``model``'s low-precision weights are fp32."""
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, WgradQueue):
                value.fp32_grads = on


@torch.no_grad()  # the queue may run outside autograd's backward
def _accumulate_grad(
    weight: torch.Tensor, grad_out_nk: torch.Tensor, x_nm: torch.Tensor, fp32: bool
) -> None:
    """``weight.grad += grad_out^T @ x`` ([k, m]). The gradient is fp32, written and
    accumulated by the GEMM itself, for an fp32 weight, an fp32 gradient already there, or
    (``fp32``) a new gradient of a low-precision weight, which ``Tensor.grad_dtype`` lets
    hold one; else it is created in the weight's dtype, as AccumulateGrad would."""
    grad = weight.grad
    if grad is None:
        in_fp32 = fp32 or weight.dtype == torch.float32
        # (an earlier step's fp32 request stays on the parameter until reset here)
        weight.grad_dtype = torch.float32 if in_fp32 else weight.dtype
        if in_fp32:
            grad = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            mm_fp32_into(grad, grad_out_nk.t(), x_nm, accumulate=False)
        else:
            grad = grad_out_nk.t() @ x_nm
        weight.grad = grad.to(weight.grad_dtype)
    elif grad.dtype == torch.float32:
        addmm_fp32_(grad, grad_out_nk.t(), x_nm)
    else:
        grad += (grad_out_nk.t() @ x_nm).to(grad.dtype)


class _LinearDeferredWgrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, queue):
        x_c, w_c = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, w_c)
        ctx.weight, ctx.queue, ctx.x_dtype = weight, queue, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x_c, w_c, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x_c, w_c = ctx.saved_tensors
        grad_out = grad_out.to(w_c.dtype)
        grad_x = (grad_out @ w_c).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_out_nk = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out_nk.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[1]:
            weight, x_nm = ctx.weight, x_c.reshape(-1, x_c.shape[-1])
            fp32 = ctx.queue.fp32_grads
            ctx.queue.push(lambda: _accumulate_grad(weight, grad_out_nk, x_nm, fp32))
        ctx.weight = None
        return grad_x, None, grad_bias, None, None


def linear(
    x: torch.Tensor, module: torch.nn.Linear, queue: WgradQueue | None, add_bias: bool = True
) -> torch.Tensor:
    """``module(x)`` (without its bias when not ``add_bias``: a fused op adds it); with a
    ``queue`` the weight gradient is pushed there instead of computed in this node's backward
    (the queue's owner must run it before the step reads gradients)."""
    bias = module.bias if add_bias else None
    if queue is None or not torch.is_grad_enabled():
        return F.linear(x, module.weight, bias)
    dtype = linear_compute_dtype(x, module.weight)
    return _LinearDeferredWgrad.apply(x, module.weight, bias, dtype, queue)


class DeferrableLinear(torch.nn.Linear):
    """``torch.nn.Linear`` whose weight gradient waits in ``wgrad_queue`` when one is set
    (:func:`megatron.model.parallelize.parallelize` sets it; None: ``F.linear``, as nn.Linear).
    ``forward(x, add_bias=False)`` skips the bias (a fused op adds it)."""

    wgrad_queue: WgradQueue | None = None

    def forward(self, x: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        return linear(x, self, self.wgrad_queue, add_bias)
