"""The fused QKV projection written straight into the Ulysses all-to-all's send layout.

The plain projection gives ``[s/p, b, (hq + 2 hkv) d]``; the all-to-all then needs, for each
destination rank r, a contiguous block of rank r's query, key and value heads, so a strided
copy packs it (and, in backward, one unpacks the received dQ/dK/dV into the projection's
gradient). Here the projection computes block r directly, ``x @ W_r^T`` into ``out[r]``,
where ``W_r`` holds the weight rows of rank r's heads: the output ``[p, s/p * b, c]`` *is*
the send buffer, and the backward exchange's receive buffer *is* its gradient. The weight
keeps Megatron's layout (checkpoints are unchanged); its rows are gathered per call. The
weight gradient needs no scatter back: each of the q, k and v sections of the weight holds
the ranks' blocks in rank order, so one batched GEMM per section writes them in place.
"""

from __future__ import annotations

import torch

from megatron.core.sequence.heads import head_split
from megatron.model.matmul import linear_compute_dtype


def rank_major_rows(
    num_heads: int, num_kv_heads: int, head_dim: int, sp: int, device=None
) -> torch.Tensor:
    """Weight rows in send order: for each rank r, its q heads, then its k and v heads.

    Rank r's heads are :func:`~megatron.core.sequence.heads.head_split`'s (as for the plain
    all-to-all), which must give every rank as many; where K/V heads are copied, rows repeat.
    """
    split = head_split(num_heads, num_kv_heads, sp)
    if not split.even:
        raise ValueError(f"{num_heads} heads, {num_kv_heads} K/V heads: uneven over {sp} ranks")
    q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
    hq = num_heads // sp
    rows = []
    for r, kv_heads in enumerate(split.kv_heads):
        q = torch.arange(r * hq * head_dim, (r + 1) * hq * head_dim)
        kv = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kv_heads])
        rows += [q, q_width + kv, q_width + kv_width + kv]
    return torch.cat(rows).to(device)


class _RankMajorLinear(torch.autograd.Function):
    """``out[r] = x @ W[rows_r]^T + bias[rows_r]``; ``out`` ``[p, n, c]``, ``x`` ``[n, h]``.

    ``widths``: the columns of rank r's q, k and v blocks; None where K/V rows repeat."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, sp, widths, dtype):
        x_c = x.to(dtype)
        # [p, c, h]: rank r's rows in block r
        w = weight.to(dtype).index_select(0, rows).view(sp, -1, weight.shape[1])
        b = None if bias is None else bias.to(dtype).index_select(0, rows).view(sp, -1)
        out = x_c.new_empty(sp, x.shape[0], w.shape[1])
        # (unbind: one op for all the blocks' views; forward passes are CPU-bound)
        biases = [None] * sp if b is None else b.unbind(0)
        for w_r, b_r, out_r in zip(w.transpose(1, 2).unbind(0), biases, out.unbind(0)):
            if b_r is None:
                torch.mm(x_c, w_r, out=out_r)
            else:
                torch.addmm(b_r, x_c, w_r, out=out_r)
        # Backward needs the gathered rows: keep them where they are a new low-precision
        # copy anyway (as autocast keeps F.linear's), else gather them again from the weight.
        ctx.regather = weight.dtype == dtype
        ctx.save_for_backward(x_c, weight if ctx.regather else w, rows)
        ctx.sp, ctx.widths, ctx.x_dtype = sp, widths, x.dtype
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # [p, n, c]
        x_c, w, rows = ctx.saved_tensors
        if ctx.regather:
            w = w.index_select(0, rows).view(ctx.sp, -1, w.shape[1])
        grad_out = grad_out.to(x_c.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out[0] @ w[0]  # [n, h]: the K dimension is split over the blocks
            for r in range(1, ctx.sp):
                grad_x.addmm_(grad_out[r], w[r])
            grad_x = grad_x.to(ctx.x_dtype)
        repeats = ctx.widths is None
        if ctx.needs_input_grad[1] and repeats:
            grad_rows = w.new_empty(w.shape)  # [p, c, h]
            for r in range(ctx.sp):
                torch.mm(grad_out[r].t(), x_c, out=grad_rows[r])
            grad_w = _scatter_rows(grad_rows.flatten(0, 1), rows, ctx.weight_shape, repeats)
            grad_w = grad_w.to(ctx.weight_dtype)
        elif ctx.needs_input_grad[1]:
            grad_w = _wgrad_by_section(grad_out, x_c, ctx.widths, ctx.weight_shape)
            grad_w = grad_w.to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            n_out = (ctx.weight_shape[0],)
            grad_b = _scatter_rows(grad_out.sum(1).flatten(), rows, n_out, repeats)
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _wgrad_by_section(
    grad_pnc: torch.Tensor, x_nh: torch.Tensor, widths: tuple[int, ...], shape
) -> torch.Tensor:
    """``grad^T @ x`` in the weight's own row order. Section j (q, k, v) starts at row
    ``p * sum(widths[:j])`` and holds rank r's ``widths[j]`` rows at block r, which is the
    gradient's columns ``[sum(widths[:j]), +widths[j])`` of block r: one batched GEMM per
    section over the ranks, written in place."""
    p, n, _ = grad_pnc.shape
    grad_w = x_nh.new_empty(shape)
    x_pnh = x_nh.expand(p, n, x_nh.shape[1])  # the same x for every rank's block
    col = 0
    for width in widths:
        rows_pwh = grad_w[p * col : p * (col + width)].view(p, width, -1)
        torch.bmm(grad_pnc[:, :, col : col + width].transpose(1, 2), x_pnh, out=rows_pwh)
        col += width
    return grad_w


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, shape, repeats: bool) -> torch.Tensor:
    """The tensor of ``shape`` whose rows ``rows`` are ``values`` (summed where rows repeat)."""
    if repeats:
        return values.new_zeros(shape).index_add_(0, rows, values)
    return values.new_empty(shape).index_copy_(0, rows, values)


def rank_major_linear(
    x_sbh: torch.Tensor,
    module: torch.nn.Linear,
    rows: torch.Tensor,
    sp: int,
    widths: tuple[int, int, int] | None,
) -> torch.Tensor:
    """``module(x_sbh)`` (``[s/p, b, h]``) with its outputs in send order: ``[p, s/p, b, c]``.

    ``rows``: :func:`rank_major_rows`; ``widths``: the columns of each rank's q, k and v
    blocks, or None where rows repeat (fewer K/V heads than ranks)."""
    s, b, h = x_sbh.shape
    dtype = linear_compute_dtype(x_sbh, module.weight)
    x_nh = x_sbh.reshape(s * b, h)
    out = _RankMajorLinear.apply(x_nh, module.weight, module.bias, rows, sp, widths, dtype)
    return out.view(sp, s, b, -1)


class RankMajorQKV:
    """The attention's Q/K/V projection and Ulysses attention through the send layout.

    Set on :class:`~megatron.model.attention.ParallelAttention` by the parallelisation step
    (SP without RoPE); ``core_attention`` is then a
    :class:`~megatron.core.sequence.layer.DistributedAttention`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sp: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim, self.sp = (
            num_heads,
            num_kv_heads,
            head_dim,
            sp,
        )
        self._rows: dict[torch.device, torch.Tensor] = {}  # rank_major_rows, per device
        split = head_split(num_heads, num_kv_heads, sp)
        self.kv_repeats = split.kv_replicated
        kv_local = split.kv_counts[0]
        # Columns of rank r's q, k and v blocks in the send buffer.
        self.rank_widths = (num_heads * head_dim // sp, *(2 * (kv_local * head_dim,)))

    def attend(
        self,
        hidden_sbh: torch.Tensor,
        projection: torch.nn.Linear,
        core_attention: torch.nn.Module,
        doc_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """``[s/p, b, h]`` -> the context ``[s/p, b, hq, d]``: Q/K/V projected straight into
        the all-to-all's send order, then ``core_attention.attend_rank_major``."""
        device = hidden_sbh.device
        if device not in self._rows:
            self._rows[device] = rank_major_rows(
                self.num_heads, self.num_kv_heads, self.head_dim, self.sp, device
            )
        widths = None if self.kv_repeats else self.rank_widths
        qkv_pnc = rank_major_linear(hidden_sbh, projection, self._rows[device], self.sp, widths)
        kwargs = {} if doc_ids is None else {"doc_ids": doc_ids}
        return core_attention.attend_rank_major(qkv_pnc, self.rank_widths, self.head_dim, **kwargs)
