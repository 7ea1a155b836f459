"""Triton kernels. Importing this package does not import triton (the model stays importable
without it); each kernel module does, when a fused path first runs."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def triton_kernels_can_run(device: torch.device) -> bool:
    """Our Triton kernels run on CUDA, and on CPU only in the Triton interpreter (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor, approximate: str = "none", use_triton: bool | None = None
) -> torch.Tensor:
    """``gelu(x + bias)`` in ``x``'s dtype, ``approximate`` as ``F.gelu``'s. The Triton kernels
    (:mod:`megatron.ops.bias_gelu_triton`) run on CUDA (``use_triton=None``); elsewhere
    PyTorch's ops compute the same function, without importing triton."""
    if use_triton is None:
        use_triton = x.is_cuda
    if not use_triton:
        return F.gelu(x + bias.to(x.dtype), approximate=approximate)
    from megatron.ops.bias_gelu_triton import BiasGeLU

    return BiasGeLU.apply(x, bias, approximate == "tanh")
