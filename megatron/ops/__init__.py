"""Triton kernels. Importing this package does not import triton (the model stays importable
without it); each kernel module does, when a fused path first runs."""

from __future__ import annotations

import os

import torch


def triton_kernels_can_run(device: torch.device) -> bool:
    """Our Triton kernels run on CUDA, and on CPU only in the Triton interpreter (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
