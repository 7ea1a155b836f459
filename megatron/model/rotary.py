"""Rotary position embeddings (RoPE), GPT-NeoX / Llama "rotate half" convention.

cos/sin come from the position ids the caller passes, so under sequence parallelism each
rank rotates its slice of q/k with the GLOBAL positions of its tokens (before the
all-to-all): the result equals the single-device computation. With ``rotary_percent < 1``
only the first ``rotary_dim`` channels of each head rotate; the rest pass through.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for ``position_ids`` [b, s]; each [s, b, 1, rotary_dim], fp32.

    Frequencies are computed on the fly in fp32 (no buffer that a cast to bf16 would spoil).
    """
    device = position_ids.device
    exponent = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (theta**exponent)  # [rot/2]
    angles_sbf = position_ids.t().to(torch.float32)[..., None] * inv_freq  # [s, b, rot/2]
    angles_sbf = torch.cat((angles_sbf, angles_sbf), dim=-1)[:, :, None, :]  # [s, b, 1, rot]
    return angles_sbf.cos(), angles_sbf.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t_sbhd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of each head of ``t_sbhd`` [s, b, h, d].

    The rotation runs in fp32 and the result is cast back to the input's dtype.
    """
    rot = cos.shape[-1]
    t_rot, t_pass = t_sbhd[..., :rot], t_sbhd[..., rot:]
    out = _rotate_tile(t_rot, cos, sin, 1.0)
    if t_pass.shape[-1] == 0:
        return out
    return torch.cat((out, t_pass), dim=-1)


def _rotate_tile(t_sbhd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float):
    """The rotation of ``t_sbhd``'s channels (all of them rotate) in fp32, cast back;
    ``sign`` -1 rotates back (the transpose, for the gradient)."""
    t32 = t_sbhd.float()
    return (t32 * cos + _rotate_half(t32) * (sin * sign)).to(t_sbhd.dtype)


class _RotateQKV(torch.autograd.Function):
    """``[s, b, hq + 2 hkv, d]`` -> the same with q's and k's heads rotated, v copied."""

    @staticmethod
    def forward(ctx, qkv_sbhd, cos, sin, rotated_heads: int):
        ctx.save_for_backward(cos, sin)
        ctx.rotated_heads = rotated_heads
        return _rotate_heads(qkv_sbhd, cos, sin, rotated_heads, 1.0)

    @staticmethod
    def backward(ctx, grad_sbhd):
        cos, sin = ctx.saved_tensors
        # A rotation's transpose is the rotation by minus the angle.
        return _rotate_heads(grad_sbhd, cos, sin, ctx.rotated_heads, -1.0), None, None, None


def _rotate_heads(x_sbhd, cos, sin, rotated_heads: int, sign: float) -> torch.Tensor:
    """On CUDA one Triton pass (``megatron.ops.rope_triton``, the same arithmetic); elsewhere
    PyTorch's ops."""
    if x_sbhd.is_cuda:
        from megatron.ops.rope_triton import rotate_heads  # imports triton: lazily

        return rotate_heads(x_sbhd, cos, sin, rotated_heads, sign)
    out = torch.empty_like(x_sbhd, memory_format=torch.contiguous_format)
    rot = cos.shape[-1]
    out[:, :, rotated_heads:] = x_sbhd[:, :, rotated_heads:]  # v
    out[:, :, :rotated_heads, rot:] = x_sbhd[:, :, :rotated_heads, rot:]  # pass-through channels
    out[:, :, :rotated_heads, :rot] = _rotate_tile(
        x_sbhd[:, :, :rotated_heads, :rot], cos, sin, sign
    )
    return out


def rotate_qkv(
    qkv_sbhd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[s, b, h, d]`` from the QKV projection's output ``[s, b, q_heads + 2 kv_heads,
    d]`` (q's heads, then k's, then v's), q and k rotated as :func:`apply_rotary` rotates
    them (the same values; on CUDA one Triton pass, whose fused multiply-add may round the
    last bit differently); views of one new buffer."""
    out = _RotateQKV.apply(qkv_sbhd, cos, sin, q_heads + kv_heads)
    return out.split((q_heads, kv_heads, kv_heads), dim=2)
