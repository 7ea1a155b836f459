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
    t32 = t_rot.float()
    out = (t32 * cos + _rotate_half(t32) * sin).to(t_sbhd.dtype)
    if t_pass.shape[-1] == 0:
        return out
    return torch.cat((out, t_pass), dim=-1)
