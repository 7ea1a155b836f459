"""Triton kernels. Importing this package does not import triton (the model stays importable
without it); each kernel module does, when a fused path first runs."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch 2.11's cuDNN attention backward (cuDNN 9.19) returned wrong gradients, off by
    more than their own size, when the output's gradient was a ``[b, h, s, d]`` view of
    ``[s, b, h, d]`` memory (what comes back through ``permute``); with the same values
    contiguous they were right (H200, docs/performance.md). One copy of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``, whose gradient reaches the ops before it contiguous (see ``_ContiguousGrad``)."""
    return _ContiguousGrad.apply(x)


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
