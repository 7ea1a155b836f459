"""The fused Q/K/V projection and Ulysses' first exchange, overlapped (``--sp-qkv-overlap``).

Plainly, the projection ``x @ W^T + b`` runs as one GEMM, its Q, K and V columns are packed
per destination rank (three strided copies) and one all-to-all sends them, with nothing else
running while it is in flight. Here the projection is computed one destination rank at a
time, from the rows of ``W`` that hold that rank's heads (``[q_r | k_r | v_r]``), each into
its own contiguous send block; one all-to-all then sends the other ranks' blocks straight
into their slots of the output while the GEMM of this rank's own heads runs, writing into
its slot. No packing copy is made, and the local GEMM hides part of the exchange. The output
buffer is ``[p, s/p, b, w]`` (``w`` = a rank's Q|K|V width) = ``[s, b, w]`` in sequence
order, and Q, K, V are column views of it, as the plain path returns them.

Backward is the plain path's: dQ/dK/dV go back in one all-to-all (with the backward-overlap
work, e.g. deferred weight gradients, launched meanwhile) straight into the columns of the
projection's gradient, then one GEMM each for the input and weight gradients. Same values as
the plain path up to the GEMMs' summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megatron.core.comm import _grads_or_zeros, exchange_blocks_start, head_to_seq


def _rank_major(t: torch.Tensor, widths: Sequence[int], p: int, dtype: torch.dtype):
    """Rows of ``t`` ([sum(widths), ...]) regrouped by destination rank: ``[p, w, ...]`` with
    rank r's block of each of Q, K, V in turn, cast to ``dtype`` in the same copy."""
    out = torch.empty((p, sum(widths) // p, *t.shape[1:]), dtype=dtype, device=t.device)
    start = col = 0
    for width in widths:
        out[:, col : col + width // p].copy_(t[start : start + width].unflatten(0, (p, -1)))
        start, col = start + width, col + width // p
    return out


class QKVProjectionSeqToHead(torch.autograd.Function):
    """``x [s/p, b, H]`` -> Q, K, V ``[s, b, h_t/p, d]`` (views of one buffer)."""

    @staticmethod
    def forward(ctx, group, heads, head_dim, dtype, backward_overlap, x, weight, bias):
        p, me = dist.get_world_size(group), dist.get_rank(group)
        s_local, b, hidden = x.shape
        widths = [h * head_dim for h in heads]
        x_nh = x.to(dtype).reshape(s_local * b, hidden)
        w_c = weight.to(dtype)
        w_rm = _rank_major(w_c, widths, p, dtype)  # [p, w, H]
        b_rm = None if bias is None else _rank_major(bias, widths, p, dtype)  # [p, w]
        out = torch.empty((p, s_local * b, w_rm.shape[1]), dtype=dtype, device=x.device)

        def project(rank: int, into: torch.Tensor | None = None) -> torch.Tensor:
            if b_rm is None:
                return torch.mm(x_nh, w_rm[rank].t(), out=into)
            return torch.addmm(b_rm[rank], x_nh, w_rm[rank].t(), out=into)

        sends = [None if r == me else project(r) for r in range(p)]  # [s/p * b, w] each
        work = exchange_blocks_start(sends, [None if r == me else out[r] for r in range(p)], group)
        project(me, out[me])  # while the other blocks travel
        work.wait()
        del sends
        ctx.save_for_backward(x_nh, w_c)
        ctx.group, ctx.overlap, ctx.x_shape, ctx.x_dtype = group, backward_overlap, x.shape, x.dtype
        ctx.widths, ctx.head_dim = widths, head_dim
        ctx.has_bias = bias is not None
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        full = out.view(p * s_local, b, -1)  # [s, b, w]
        views, col = [], 0
        for width in widths:
            views.append(full[..., col : col + width // p].unflatten(-1, (-1, head_dim)))
            col += width // p
        ctx.out_shapes = [v.shape for v in views]
        return tuple(views)

    @staticmethod
    def backward(ctx, *grads):
        x_nh, w_c = ctx.saved_tensors
        grads = _grads_or_zeros(grads, ctx.out_shapes, next(g for g in grads if g is not None))
        s_local, b, _ = ctx.x_shape
        grad_qkv = grads[0].new_empty((s_local, b, sum(ctx.widths)))  # [s/p, b, W], W's order
        columns, start = [], 0
        for width in ctx.widths:
            columns.append(grad_qkv[..., start : start + width].unflatten(-1, (-1, ctx.head_dim)))
            start += width
        head_to_seq(grads, ctx.group, 0, 2, out=columns, overlap=ctx.overlap)
        g_nw = grad_qkv.view(s_local * b, -1).to(w_c.dtype)
        grad_x = (g_nw @ w_c).view(ctx.x_shape).to(ctx.x_dtype)
        grad_w = (g_nw.t() @ x_nh).to(ctx.dtypes[0]) if ctx.needs_input_grad[6] else None
        grad_b = g_nw.sum(0).to(ctx.dtypes[1]) if ctx.has_bias and ctx.needs_input_grad[7] else None
        return None, None, None, None, None, grad_x, grad_w, grad_b


def qkv_projection_seq_to_head(
    x_sbh: torch.Tensor,
    projection: torch.nn.Linear,
    heads: tuple[int, int, int],
    head_dim: int,
    group: dist.ProcessGroup,
    dtype: torch.dtype,
    backward_overlap: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V ``[s, b, h_t/p, d]`` of ``projection(x_sbh)`` ([s/p, b, H]; its output columns
    hold ``heads`` = (query, key, value) heads of ``head_dim`` in turn), computed in ``dtype``
    and exchanged to the head-sharded layout with the GEMMs and transfers overlapped."""
    return QKVProjectionSeqToHead.apply(
        group, heads, head_dim, dtype, backward_overlap, x_sbh, projection.weight, projection.bias
    )
