"""The normalisation layer chosen by ``--normalization`` (PyTorch's own, no apex).

The norms compute in fp32 and return fp32 on every device, whatever the dtypes of the
residual stream (bf16/fp16 unless ``--fp32-residual-connection``) and of the weights (FSDP2
gathers them in the compute dtype under ZeRO): CUDA autocast would do this for LayerNorm,
but CPU autocast runs it in bf16, CPU kernels refuse mixed dtypes and RMSNorm is not an
autocast op. The next linear casts the output for its matmul, as autocast does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.model.config import ModelConfig


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` upcast to fp32 where it is low precision (fp64 stays)."""
    if t is None or t.dtype not in (torch.bfloat16, torch.float16):
        return t
    return t.float()


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` in fp32 (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            _fp32(x), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps
        )


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` in fp32 (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(_fp32(x), self.normalized_shape, _fp32(self.weight), self.eps)


def build_norm(config: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the hidden size."""
    kwargs = {"eps": config.layernorm_epsilon, "device": device, "dtype": config.params_dtype}
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, **kwargs)
    return LayerNorm(config.hidden_size, **kwargs)
