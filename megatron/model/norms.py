"""The normalisation layer chosen by ``--normalization`` (PyTorch's own, no apex)."""

from __future__ import annotations

import torch

from megatron.model.config import ModelConfig


def build_norm(config: ModelConfig, device: torch.device | str | None = None) -> torch.nn.Module:
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the hidden size."""
    kwargs = {"eps": config.layernorm_epsilon, "device": device, "dtype": config.params_dtype}
    if config.normalization == "RMSNorm":
        return torch.nn.RMSNorm(config.hidden_size, **kwargs)
    return torch.nn.LayerNorm(config.hidden_size, **kwargs)
