"""Matmul helpers shared by the chunked loss and the deferred-weight-gradient linear."""

from __future__ import annotations

import torch


def linear_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype ``F.linear`` would use: autocast's when it is on, else the inputs'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` into the fp32 ``acc`` for fp32 or lower-precision ``a``, ``b``.

    On CUDA one GEMM accumulates straight into ``acc`` (fp32 output from bf16/fp16 inputs)
    instead of a low-precision product, its fp32 copy and an add. Elsewhere, product + add."""
    if a.dtype == torch.float32 or acc.device.type != "cuda":
        return acc.addmm_(a, b) if a.dtype == acc.dtype else acc.add_(a @ b)
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def mm_fp32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or, ``accumulate``, ``out += a @ b``, into the fp32 ``out`` (a view
    with contiguous rows will do); one GEMM with fp32 output on CUDA."""
    if accumulate:
        addmm_fp32_(out, a, b)
    elif a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif out.device.type != "cuda":
        out.copy_(a @ b)
    else:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
