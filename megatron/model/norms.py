"""The normalisation layer chosen by ``--normalization`` (PyTorch's own, no apex).

Under ZeRO with ``--bf16/--fp16`` FSDP2 gathers a layer's norm weights in the compute dtype
while the residual stream (the norm's input) stays fp32. The norms upcast such weights to
the input's dtype, so they compute in fp32 on every device: CUDA autocast would do this
for LayerNorm, but CPU kernels refuse mixed dtypes and RMSNorm is not an autocast op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.model.config import ModelConfig


def _like(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``param`` in ``x``'s dtype when ``x`` is fp32 and ``param`` is low precision."""
    if param is None or param.dtype == x.dtype or x.dtype != torch.float32:
        return param
    return param.to(x.dtype)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with low-precision weights upcast to an fp32 input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, _like(self.weight, x), _like(self.bias, x), self.eps
        )


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with a low-precision weight upcast to an fp32 input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, _like(self.weight, x), self.eps)


def build_norm(config: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the hidden size."""
    kwargs = {"eps": config.layernorm_epsilon, "device": device, "dtype": config.params_dtype}
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, **kwargs)
    return LayerNorm(config.hidden_size, **kwargs)
