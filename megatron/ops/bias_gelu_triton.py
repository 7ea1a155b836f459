"""Bias add + GeLU in one Triton pass each way (Megatron's bias-GeLU fusion, on by default;
``--no-bias-gelu-fusion`` turns it off).

The MLP's first linear then runs without its bias. Forward reads the product once and
writes ``gelu(x + b)``; backward writes ``dx = dy * gelu'(x + b)`` and sums it over the
rows for the bias gradient in the same pass, instead of a GeLU-backward kernel and a
separate column-sum reading ``dx`` again. The GeLU is exact (erf) or, with
``--openai-gelu``, the tanh approximation: the same function as the unfused model, computed
in fp32 from the low-precision product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles (rows x features) and warps per program; the backward's programs per feature block
# each sum their rows' dx. The fastest of benchmarks/bench_bias_gelu.py's sweep on H100 at
# [8192, 8192] bf16 (benchmarks/results/end_to_end_1p3b_h100x4_2026-11-28.md).
FWD_TILE = {"BLOCK_R": 16, "BLOCK_F": 256, "num_warps": 4}
BWD_TILE = {"BLOCK_R": 32, "BLOCK_F": 128, "num_warps": 8}
BWD_ROW_PROGRAMS = 64


# fmt: off
@triton.jit
def _gelu_parts(z, TANH: tl.constexpr):
    """(gelu(z), gelu'(z)) in fp32."""
    if TANH:
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        inner = k0 * (z + 0.044715 * z * z * z)
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)  # tanh(inner), finite for large |inner|
        y = 0.5 * z * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        y = z * cdf
        dy = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)  # + z * pdf(z)
    return y, dy


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, n_rows, F_: tl.constexpr, TANH: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < F_)
    offs = rows[:, None] * F_ + cols[None, :]
    b = tl.load(B + cols, mask=cols < F_, other=0.0).to(tl.float32)
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
    y, _ = _gelu_parts(z, TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB_PART, n_rows, F_: tl.constexpr,
                          TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
                          TILES: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    first = tl.program_id(1).to(tl.int64) * (TILES * BLOCK_R)  # TILES row tiles per program
    b = tl.load(B + cols, mask=cols < F_, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_F], dtype=tl.float32)  # reduced over rows once, at the end
    for t in range(TILES):
        rows = first + t * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < F_)
        offs = rows[:, None] * F_ + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        _, d = _gelu_parts(z, TANH)
        dx = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * d
        dx = tl.where(mask, dx, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        db += dx
    tl.store(DB_PART + tl.program_id(1) * F_ + cols, tl.sum(db, axis=0), mask=cols < F_)
# fmt: on


class BiasGeLU(torch.autograd.Function):
    """``gelu(x + bias)`` over the last dimension; see the module docstring."""

    @staticmethod
    def forward(ctx, x, bias, tanh: bool):
        f = x.shape[-1]
        x2 = x.reshape(-1, f).contiguous()
        n = x2.shape[0]
        y = torch.empty_like(x2)
        if n:
            grid = (triton.cdiv(n, FWD_TILE["BLOCK_R"]), triton.cdiv(f, FWD_TILE["BLOCK_F"]))
            _bias_gelu_fwd_kernel[grid](x2, bias, y, n, F_=f, TANH=tanh, **FWD_TILE)
        ctx.save_for_backward(x2, bias)
        ctx.tanh = tanh
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x2, bias = ctx.saved_tensors
        n, f = x2.shape
        shape = grad_y.shape
        dy = grad_y.reshape(n, f).contiguous()
        dx = torch.empty_like(x2)
        rows = BWD_TILE["BLOCK_R"]
        tiles = triton.cdiv(triton.cdiv(n, rows), BWD_ROW_PROGRAMS) or 1  # per program
        programs = triton.cdiv(n, tiles * rows) or 1
        db_part = torch.empty((programs, f), dtype=torch.float32, device=x2.device)
        if n:
            _bias_gelu_bwd_kernel[(triton.cdiv(f, BWD_TILE["BLOCK_F"]), programs)](
                dy, x2, bias, dx, db_part, n, F_=f, TANH=ctx.tanh, TILES=tiles, **BWD_TILE
            )
        return dx.view(shape), db_part.sum(0).to(bias.dtype), None
