"""RoPE of q and k inside the QKV buffer in one Triton pass (``rotary.rotate_qkv`` on CUDA).

``rotate_heads(x_sbhd, cos, sin, rotated_heads, sign)`` returns a new ``[s, b, h, d]``
buffer: the first ``rotated_heads`` heads (q's, then k's) rotated by the angles of
``cos``/``sin`` (``[s, b, 1, rot]``, fp32) in their first ``rot`` channels, every other
element copied. Each element is read once (its rotation partner a second time, from cache)
and written once, with fp32 arithmetic in registers, where PyTorch's ops make fp32 copies and
a pass per operation. ``sign`` -1 rotates back: the transpose, for the gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 4096  # one program: a block of heads of one token


# fmt: off
@triton.jit
def _rope_kernel(X, COS, SIN, OUT, H, ROTATED, D: tl.constexpr, ROT: tl.constexpr,
                 SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (s, b) token
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ch = tl.arange(0, BLOCK_D)
    inside = (heads < H)[:, None] & (ch < D)[None, :]
    base = X + row * H * D + heads[:, None] * D
    x = tl.load(base + ch[None, :], mask=inside, other=0.0).to(tl.float32)
    half: tl.constexpr = ROT // 2
    in_rot = ch < ROT
    rotates = inside & (heads < ROTATED)[:, None] & in_rot[None, :]
    partner = tl.where(ch < half, ch + half, ch - half)
    xp = tl.load(base + partner[None, :], mask=rotates, other=0.0).to(tl.float32)
    c = tl.load(COS + row * ROT + ch, mask=in_rot, other=1.0)
    s = tl.load(SIN + row * ROT + ch, mask=in_rot, other=0.0)
    s = tl.where(ch < half, -s, s) * SIGN  # rotate_half: (-x2, x1)
    y = tl.where(rotates, x * c[None, :] + xp * s[None, :], x)
    tl.store(OUT + row * H * D + heads[:, None] * D + ch[None, :],
             y.to(OUT.dtype.element_ty), mask=inside)
# fmt: on


def rotate_heads(
    x_sbhd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotated_heads: int, sign: float
) -> torch.Tensor:
    """``x_sbhd`` with its first ``rotated_heads`` heads rotated (see the module's text)."""
    x = x_sbhd.contiguous()
    s, b, h, d = x.shape
    rot = cos.shape[-1]
    if rot > d or rot % 2:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit q/k/v {tuple(x.shape)}")
    cos, sin = (t.float().expand(s, b, 1, rot).contiguous() for t in (cos, sin))
    out = torch.empty_like(x)
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(h), max(1, ELEMENTS_PER_PROGRAM // block_d))
    grid = (s * b, triton.cdiv(h, block_h))
    _rope_kernel[grid](
        x, cos, sin, out, h, rotated_heads, D=d, ROT=rot, SIGN=float(sign),
        BLOCK_H=block_h, BLOCK_D=block_d,
    )  # fmt: skip
    return out
