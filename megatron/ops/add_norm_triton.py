"""Residual add + LayerNorm/RMSNorm in one Triton pass (``--fused-residual-norm``).

In the transformer ``r = x + y`` (the residual stream plus a block's output) is
followed by a norm: the attention block's by the post-attention norm, the MLP block's by the
next layer's input norm (or the final norm), whose output autocast then casts for the next
linear. Unfused that is an add, the norm and a cast in forward and, in
backward, the cast's gradient, the norm's input and weight gradients and the residual
gradient's accumulation: about twice the memory traffic of one fused pass each way.

:func:`fused_add_norm` returns ``(r, norm(r))`` with ``norm(r)`` written directly in the
requested dtype; the statistics are fp32 as in PyTorch's norms. Backward returns the same
gradient for ``x`` (in its dtype) and ``y`` (in its), plus the weight/bias gradients.

With ``y_bias`` (Megatron's bias-dropout-add fusion, without dropout) the block's linear
skips its bias and ``r = x + y + y_bias``; the bias gradient, the column sum of ``r``'s
gradient, comes from the same backward pass instead of a separate reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BWD_PROGRAMS = 256  # backward programs; each sums its rows' weight/bias gradients


# fmt: off
@triton.jit
def _add_norm_fwd_kernel(X, Y, YB, W, B, R, OUT, MEAN, RSTD, eps, H: tl.constexpr,
                         BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_YB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    y = tl.load(Y + row * H + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_YB:
        y += tl.load(YB + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(X + row * H + offs, mask=mask, other=0.0).to(tl.float32) + y
    r = r.to(R.dtype.element_ty).to(tl.float32)  # the stored residual (bf16 stream: rounded)
    tl.store(R + row * H + offs, r, mask=mask)
    if RMS:
        mean = tl.sum(r, axis=0) * 0.0
        d = r
    else:
        mean = tl.sum(r, axis=0) / H
        d = tl.where(mask, r - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
    out = d * rstd * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * H + offs, out.to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_norm_bwd_kernel(DOUT, DR_IN, R, W, MEAN, RSTD, DX, DY, DW_PART, DB_PART, DYB_PART,
                         n_rows, H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                         RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DR_IN: tl.constexpr,
                         SAME_DY: tl.constexpr, HAS_YB: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    dyb = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        live = row < n_rows
        rmask = mask & live
        r = tl.load(R + row * H + offs, mask=rmask, other=0.0)
        mean = tl.load(MEAN + row, mask=live, other=0.0)
        rstd = tl.load(RSTD + row, mask=live, other=0.0)
        xhat = tl.where(rmask, (r - mean) * rstd, 0.0)
        dout = tl.load(DOUT + row * H + offs, mask=rmask, other=0.0).to(tl.float32)
        g = dout * w
        c2 = tl.sum(g * xhat, axis=0) / H
        if RMS:
            dr = (g - xhat * c2) * rstd
        else:
            dr = (g - tl.sum(g, axis=0) / H - xhat * c2) * rstd
        if HAS_DR_IN:
            dr += tl.load(DR_IN + row * H + offs, mask=rmask, other=0.0).to(tl.float32)
        tl.store(DX + row * H + offs, dr.to(DX.dtype.element_ty), mask=rmask)
        if not SAME_DY:
            tl.store(DY + row * H + offs, dr.to(DY.dtype.element_ty), mask=rmask)
        dw += dout * xhat
        db += dout
        if HAS_YB:
            dyb += tl.where(rmask, dr, 0.0)
    tl.store(DW_PART + pid * H + offs, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * H + offs, db, mask=mask)
    if HAS_YB:
        tl.store(DYB_PART + pid * H + offs, dyb, mask=mask)
# fmt: on


class FusedAddNorm(torch.autograd.Function):
    """``(x + y [+ y_bias], norm(...))``; see the module docstring. Tensors are ``[..., H]``."""

    @staticmethod
    def forward(ctx, x, y, y_bias, weight, bias, eps: float, rms: bool, out_dtype: torch.dtype):
        h = x.shape[-1]
        x2, y2 = x.reshape(-1, h).contiguous(), y.reshape(-1, h).contiguous()
        n = x2.shape[0]
        r = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
        out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        if n:
            _add_norm_fwd_kernel[(n,)](
                x2, y2, y_bias if y_bias is not None else weight, weight,
                bias if bias is not None else weight, r, out, mean, rstd, eps,
                H=h, BLOCK=triton.next_power_of_2(h), RMS=rms, HAS_BIAS=bias is not None,
                HAS_YB=y_bias is not None, num_warps=8,
            )  # fmt: skip
        ctx.save_for_backward(r, weight, bias, mean, rstd)
        ctx.rms, ctx.x_dtype, ctx.y_dtype = rms, x.dtype, y.dtype
        ctx.y_bias_dtype = None if y_bias is None else y_bias.dtype
        return r.view(x.shape), out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_r, grad_out):
        r, weight, bias, mean, rstd = ctx.saved_tensors
        n, h = r.shape
        shape = grad_out.shape
        dout = grad_out.reshape(n, h).contiguous()
        dr_in = grad_r.reshape(n, h).contiguous() if grad_r is not None else None
        dx = torch.empty((n, h), dtype=ctx.x_dtype, device=r.device)
        same = ctx.y_dtype == ctx.x_dtype
        dy = dx if same else torch.empty((n, h), dtype=ctx.y_dtype, device=r.device)
        programs = max(1, min(n, BWD_PROGRAMS))
        rows = triton.cdiv(n, programs)
        has_b, has_yb = bias is not None, ctx.y_bias_dtype is not None
        # Per-program partial sums of the weight, bias and branch-bias gradients, in one
        # buffer so one reduction finishes them all.
        parts = torch.empty((1 + has_b + has_yb, programs, h), dtype=torch.float32, device=r.device)
        dw_part, db_part, dyb_part = parts[0], parts[1 if has_b else 0], parts[-1]
        if not n:
            parts.zero_()
        else:
            _add_norm_bwd_kernel[(programs,)](
                dout, dr_in if dr_in is not None else dout, r, weight, mean, rstd, dx, dy,
                dw_part, db_part, dyb_part, n, H=h, BLOCK=triton.next_power_of_2(h), ROWS=rows,
                RMS=ctx.rms, HAS_BIAS=has_b, HAS_DR_IN=dr_in is not None,
                SAME_DY=same, HAS_YB=has_yb, num_warps=8,
            )  # fmt: skip
        sums = parts.sum(1)
        dw = sums[0].to(weight.dtype)
        db = sums[1].to(bias.dtype) if has_b else None
        dyb = sums[-1].to(ctx.y_bias_dtype) if has_yb else None
        return dx.view(shape), dy.view(shape), dyb, dw, db, None, None, None


def fused_add_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    norm: torch.nn.LayerNorm | torch.nn.RMSNorm,
    out_dtype: torch.dtype,
    y_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, norm(r))``, ``r = x + y (+ y_bias)``, in one pass each way; the norm's output in
    ``out_dtype``."""
    rms = isinstance(norm, torch.nn.RMSNorm)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    bias = getattr(norm, "bias", None)
    return FusedAddNorm.apply(x, y, y_bias, norm.weight, bias, eps, rms, out_dtype)
