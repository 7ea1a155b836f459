"""Which kernel ``--use-flash-attn`` runs for a shape and mask on this GPU, from measurements.

Without the flash_attn package, the ``sdpa`` backend picks its kernel from ``TABLE``: one
entry list per GPU type, each entry ``(mask, min_seq, kernel)``, the last entry of the mask
whose ``min_seq`` the sequence reaches winning. Kernels:

* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` with its own choice (cuDNN for causal
  attention with equal heads on H100/H200), blockwise from ``--sdpa-block-size``.
* ``triton``: this project's Triton FlashAttention (megatron.ops.flash_attn_triton): packed
  documents by document ids and block ranges, O(s) memory. No dropout.
* ``doc-loop``: SDPA (cuDNN/flash) once per document on its ``[start, end)`` slice
  (megatron.ops.packed_attention); one host sync per call for the boundaries.
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), the flash kernel
  over cumulative document lengths; one host sync for the longest document.

Measured on one H100 80GB (torch 2.11, cuDNN 9.19, Triton 3.6), bf16, head size 128, forward
+ backward, 2026-12-07 (docs/performance.md; ``benchmarks/bench_attention_kernels.py``):

| mask | shape | sdpa (cuDNN) | triton | doc-loop | varlen | FlexAttention |
|---|---|---|---|---|---|---|
| causal | 32K, 16 heads | 27.5 ms | 35.0 ms | - | 47.3 ms | 40.5 ms |
| causal | 128K, 4 heads | 114.1 ms | 138.5 ms | - | 193.0 ms | - |
| documents 2-8K | 32K, 16 heads | dense mask: 111 ms, +3.1 GiB | 8.49 ms | 10.4 ms | 10.2 ms | 11.8 ms |
| documents 2-8K | 128K, 4 heads | dense mask: 593 ms, +48 GiB | 8.30 ms | 22.9 ms | 10.4 ms | - |

(The dense-mask times are from an earlier run with documents of 4-6K.) FlexAttention needs
``torch.compile`` of the attention and of its block mask (uncompiled, ``create_block_mask``
tried to allocate 128 GiB at 128K), which the training step does not do around the core
attention; it stays a benchmark candidate. The H200 has the H100's compute and its entries
are the H100's until measured there.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

KERNELS = ("sdpa", "triton", "doc-loop", "varlen")
MASKS = ("causal", "documents")
TRITON_HEAD_DIMS = (64, 96, 128)

_H100 = (
    ("causal", 0, "sdpa"),
    ("documents", 0, "triton"),
)
TABLE: dict[str, tuple[tuple[str, int, str], ...]] = {"H100": _H100, "H200": _H100}
DEFAULT_GPU = "H100"  # other GPUs (and the CPU tests of the routing) use its entries


@dataclass(frozen=True)
class Choice:
    kernel: str
    why: str  # "table H100" or the reason the table's kernel could not run


@functools.cache
def gpu_type(device: torch.device) -> str:
    """ "H100", "H200", ... from the CUDA device name; the default type elsewhere."""
    if device.type != "cuda":
        return DEFAULT_GPU
    name = torch.cuda.get_device_name(device)
    return next((t for t in TABLE if t in name), DEFAULT_GPU)


def table_kernel(gpu: str, mask: str, seq: int) -> str:
    """The measured fastest kernel for ``mask`` at ``seq`` tokens on ``gpu``."""
    entries = [e for e in TABLE.get(gpu, TABLE[DEFAULT_GPU]) if e[0] == mask and seq >= e[1]]
    return entries[-1][2]


def choose(
    device: torch.device, *, mask: str, seq: int, head_dim: int, dtype: torch.dtype, dropout: bool
) -> Choice:
    """The kernel for this call: the table's, unless it cannot take the case (then the next
    O(s) candidate: per-document SDPA for documents, which takes dropout and any head dim)."""
    gpu = gpu_type(device)
    kernel = table_kernel(gpu, mask, seq)
    other = "doc-loop" if mask == "documents" else "sdpa"
    if kernel == "triton" and (dropout or head_dim not in TRITON_HEAD_DIMS):
        why = "attention dropout" if dropout else f"head dim {head_dim}"
        return Choice(other, f"{why}: the Triton kernel does not take it")
    if kernel == "varlen" and not (varlen_available() and dtype != torch.float32):
        return Choice(other, "varlen_attn needs torch >= 2.10 and fp16/bf16")
    return Choice(kernel, f"table {gpu}")


@functools.cache
def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def log_choice(gpu: str, mask: str, kernel: str, why: str) -> None:
    """One log line per (GPU, mask, kernel): the kernel in use and why."""
    logger.info("> attention (--use-flash-attn) on %s, %s: %s (%s)", gpu, mask, kernel, why)
