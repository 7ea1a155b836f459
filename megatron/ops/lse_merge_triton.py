"""The log-sum-exp merge of two attention blocks in one Triton pass, in place.

``merge_into(out_a, lse_a, out_b, lse_b)`` writes ``merge(out_a, lse_a, out_b, lse_b)``
(``megatron.model.attention_step.merge``) into ``out_a`` and ``lse_a``: each row of
``out_a`` (fp32) is read once, scaled, added to the weighted row of ``out_b`` (any float
dtype) and written back, where PyTorch's ops take two passes over ``out_a`` and a pass per
weight. Shapes: ``out`` ``[s, b, h, d]`` with unit stride along ``d``, ``lse`` ``[b, h, s]``,
any other strides (views of an accumulator). Rows that neither block sees stay zero with
``lse = -inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 32


# fmt: off
@triton.jit
def _merge_kernel(OA, LA, OB, LB, N_ROWS, B, H, D,
                  s_oa_s, s_oa_b, s_oa_h, s_ob_s, s_ob_b, s_ob_h,
                  s_la_b, s_la_h, s_la_s, s_lb_b, s_lb_h, s_lb_s,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # (s, b, h) rows
    in_r = rows < N_ROWS
    h = rows % H
    b = (rows // H) % B
    s = rows // (H * B)
    la = tl.load(LA + b * s_la_b + h * s_la_h + s * s_la_s, mask=in_r, other=float("-inf"))
    lb = tl.load(LB + b * s_lb_b + h * s_lb_h + s * s_lb_s, mask=in_r, other=float("-inf"))
    top = tl.maximum(la, lb)
    top = tl.where(top == float("-inf"), 0.0, top)  # both -inf: weights 0, lse -inf
    ea = tl.exp(la - top)
    eb = tl.exp(lb - top)
    total = ea + eb
    seen = total > 0.0
    inv = tl.where(seen, 1.0 / tl.where(seen, total, 1.0), 0.0)
    lse = tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    offs_d = tl.arange(0, BLOCK_D)
    m2 = in_r[:, None] & (offs_d[None, :] < D)
    pa = OA + (s * s_oa_s + b * s_oa_b + h * s_oa_h)[:, None] + offs_d[None, :]
    pb = OB + (s * s_ob_s + b * s_ob_b + h * s_ob_h)[:, None] + offs_d[None, :]
    oa = tl.load(pa, mask=m2, other=0.0)
    ob = tl.load(pb, mask=m2, other=0.0).to(tl.float32)
    tl.store(pa, oa * (ea * inv)[:, None] + ob * (eb * inv)[:, None], mask=m2)
    tl.store(LA + b * s_la_b + h * s_la_h + s * s_la_s, lse, mask=in_r)
# fmt: on


def merge_into(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """``merge`` written into ``out_a`` [s, b, h, d] (fp32) and ``lse_a`` [b, h, s] (fp32)."""
    s, b, h, d = out_a.shape
    if out_a.stride(3) != 1 or out_b.stride(3) != 1:
        raise ValueError("merge_into: out tensors need unit stride along the head dimension")
    n_rows = s * b * h
    if n_rows == 0:
        return out_a, lse_a
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    _merge_kernel[grid](
        out_a, lse_a, out_b, lse_b, n_rows, b, h, d,
        *out_a.stride()[:3], *out_b.stride()[:3], *lse_a.stride(), *lse_b.stride(),
        BLOCK_R=ROWS_PER_PROGRAM, BLOCK_D=triton.next_power_of_2(d), num_warps=4,
    )  # fmt: skip
    return out_a, lse_a
