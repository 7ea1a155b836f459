"""The MLP over the local sequence in tiles of tokens (``--tiled-mlp-chunk-size``).

At the longest sequences the MLP's ``[s, b, ffn]`` intermediate (``[s, b, 2 ffn]`` with
SwiGLU: gate | up, then their product) is the largest tensor of a layer. :class:`TiledMLP`
runs the MLP's forward on ``chunk`` tokens at a time without saving anything but the MLP
input; its backward recomputes one tile's forward, back-propagates through it and moves on,
summing the weight gradients over the tiles. No ``[s, ffn]`` tensor exists at any time;
one tile's ``[chunk, b, ffn]`` does. The price is one more MLP forward per backward.

The tiles split dimension 0 (the sequence, activations being ``[s, b, h]``); the MLP is
pointwise in the tokens, so the result is the untiled one up to the weight gradients'
summation order (the weight gradients are summed over the tiles in fp32, then cast to the
parameters' dtype, as one GEMM's fp32 accumulator would). The parameters are inputs of the autograd node, so their gradients flow to
``.grad`` as any other's (FSDP2's post-backward and gradient accumulation see nothing new).
The recomputation runs under the autocast state of the forward; under autocast an fp32
input is kept in the autocast dtype, as the first projection would cast it.

The parallelisation step turns it on (:func:`megatron.model.parallelize.apply_tiled_mlp`):
the layer still computes ``x + drop(mlp(norm2(x)))``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class TiledMLP(torch.autograd.Function):
    """``fn(x)`` over tiles of ``chunk`` tokens of ``x`` ``[s, b, h]``; ``params``: what
    ``fn`` reads (their gradients are this node's)."""

    @staticmethod
    def forward(ctx, fn: Callable, chunk: int, x_sbh: torch.Tensor, *params: torch.Tensor):
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.autocast = enabled, dtype = _autocast_state(x_sbh.device.type)
        ctx.x_dtype = x_sbh.dtype
        if enabled and x_sbh.dtype == torch.float32:
            # The first projection casts its input to the autocast dtype anyway: keep that
            # (half the bytes of an fp32 norm output), the same values the untiled MLP uses.
            x_sbh = x_sbh.to(dtype)
        ctx.save_for_backward(x_sbh)
        out = None
        with torch.no_grad():
            for start in range(0, x_sbh.shape[0], chunk):
                y = fn(x_sbh[start : start + chunk])  # [chunk, b, h]
                if out is None:
                    out = y.new_empty((x_sbh.shape[0], *y.shape[1:]))
                out[start : start + chunk] = y
        return out

    @staticmethod
    def backward(ctx, grad_out_sbh: torch.Tensor):
        (x_sbh,) = ctx.saved_tensors
        fn, chunk, params = ctx.fn, ctx.chunk, ctx.params
        want_x = ctx.needs_input_grad[2]
        trainable = [i for i, p in enumerate(params) if ctx.needs_input_grad[3 + i]]
        grad_x = torch.empty_like(x_sbh, dtype=ctx.x_dtype) if want_x else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        device_type = x_sbh.device.type
        for start in range(0, x_sbh.shape[0], chunk):
            x_c = x_sbh[start : start + chunk].detach().requires_grad_(want_x)
            with torch.enable_grad(), torch.autocast(device_type, dtype, enabled=enabled):
                y = fn(x_c)  # [chunk, b, h]
            inputs = ([x_c] if want_x else []) + [params[i] for i in trainable]
            grads = torch.autograd.grad(
                y, inputs, grad_out_sbh[start : start + chunk], allow_unused=True
            )
            if want_x:
                grad_x[start : start + chunk] = grads[0]
                grads = grads[1:]
            for i, g in zip(trainable, grads):
                if g is None:  # unused (the output bias, when a fused add adds it)
                    continue
                if grad_params[i] is None:  # the sum over tiles in fp32
                    grad_params[i] = g.float() if g.dtype != torch.float64 else g
                else:
                    grad_params[i].add_(g)
            del y, grads
        ctx.fn = ctx.params = None
        grad_params = [None if g is None else g.to(p.dtype) for g, p in zip(grad_params, params)]
        return (None, None, grad_x, *grad_params)


def tiled_mlp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x_sbh: torch.Tensor,
    chunk: int,
    params: list[torch.Tensor],
) -> torch.Tensor:
    """``fn(x_sbh)`` computed ``chunk`` tokens at a time (forward and backward); ``fn`` must
    be pointwise in the tokens and read only ``params``."""
    if chunk <= 0 or x_sbh.shape[0] <= chunk:
        return fn(x_sbh)
    return TiledMLP.apply(fn, chunk, x_sbh, *params)
