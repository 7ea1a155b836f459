"""The normalisation layer chosen by ``--normalization`` (PyTorch's own, no apex).

The norms compute in fp32 on every device, whatever the dtypes of the residual stream
(bf16/fp16 under autocast unless ``--fp32-residual-connection``) and of the weights (FSDP2
gathers them in the compute dtype under ZeRO), and under autocast return fp32: CUDA autocast
would do this for LayerNorm, but CPU autocast runs it in bf16, CPU kernels refuse mixed
dtypes and RMSNorm is not an autocast op. The next linear casts the output for its matmul.
Without autocast the output keeps the input's dtype.
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


def _out(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The norm's fp32 result ``y`` under autocast, else in the input's dtype."""
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` in fp32 (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(
            _fp32(x), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps
        )
        return _out(y, x)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` in fp32 (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _out(F.rms_norm(_fp32(x), self.normalized_shape, _fp32(self.weight), self.eps), x)


def build_norm(config: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the hidden size."""
    kwargs = {"eps": config.layernorm_epsilon, "device": device, "dtype": config.params_dtype}
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, **kwargs)
    return LayerNorm(config.hidden_size, **kwargs)
