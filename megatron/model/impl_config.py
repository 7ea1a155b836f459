"""ImplConfig: how the GPT model is computed (fast paths and implementation switches).

None of these changes the function the model computes beyond rounding, and none is needed
to rebuild a model from a checkpoint; the architecture is :class:`~megatron.model.ModelConfig`.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, replace
from functools import cache

import torch

from megatron.errors import UsageError

ATTENTION_BACKENDS = ("classic", "sdpa", "triton")
# Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1), and how the log names each.
TRITON_FAST_PATHS = {
    "bias_gelu_fusion": "bias-GeLU fusion",
    "fused_residual_norm": "--fused-residual-norm",
    "cross_entropy_fusion": "--cross-entropy-loss-fusion",
}

logger = logging.getLogger("megatron")


@dataclass(frozen=True)
class ImplConfig:
    """Attention backend, fused kernels, loss chunking, recompute and SP switches."""

    attention_backend: str = "classic"  # classic | sdpa | triton
    # sdpa: causal attention over at least 2 blocks of this many tokens (per rank) runs as
    # square blocks (megatron.model.blockwise_attention); 0: one kernel call.
    sdpa_block_size: int = 65536
    loss_chunk_size: int = 2048  # tokens per output-layer + cross-entropy chunk; 0: unchunked
    cross_entropy_fusion: bool = False  # chunked loss: one Triton pass per chunk (CUDA)
    loss_grad_in_forward: bool = True  # chunked loss given the mask: gradients in forward
    # Embedding and (in-forward) output-layer gradients added into .grad in place; for
    # .backward() only (torch.autograd.grad does not see them): training turns it on.
    embedding_grads_in_place: bool = False
    bias_gelu_fusion: bool = False  # GeLU MLP: fc1's bias add + GeLU in one pass (CUDA)
    fused_residual_norm: bool = False  # each residual add + the norm after it (Triton)
    bias_dropout_fusion: bool = True  # with it, no dropout: output biases added in that pass
    fp32_residual_connection: bool = False  # else the stream is autocast's dtype (bf16/fp16)
    delay_wgrad_compute: bool = False  # SP: weight gradients during the backward all-to-alls
    recompute_granularity: str | None = None  # None | "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block" (full only; default uniform)
    recompute_num_layers: int | None = None  # full only; default 1
    checkpoint_in_cpu: bool = False  # full recompute only: checkpointed inputs wait in host memory
    sp_rank_major_qkv: bool = True  # SP: Q/K/V projected straight into the send layout
    tiled_mlp_chunk_size: int = 0  # > 0: the MLP over tiles of this many tokens; 0: whole

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UsageError(
                f"attention backend {self.attention_backend!r}: expected one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.loss_chunk_size < 0:
            raise UsageError(f"--loss-chunk-size {self.loss_chunk_size} must be >= 0")
        if self.tiled_mlp_chunk_size < 0:
            raise UsageError(
                f"--tiled-mlp-chunk-size {self.tiled_mlp_chunk_size} must be >= 0 (0: off)"
            )
        if self.sdpa_block_size < 0:
            raise UsageError(f"--sdpa-block-size {self.sdpa_block_size} must be >= 0")
        g = self.recompute_granularity
        if g not in (None, "full", "selective"):
            raise UsageError(f"--recompute-granularity {g}: expected full or selective")
        if g == "full" and self.recompute_method not in (None, "uniform", "block"):
            raise UsageError(
                f"--recompute-method {self.recompute_method}: expected uniform or block"
            )

    def with_recompute_defaults(self, num_layers: int) -> ImplConfig:
        """Full recompute's method and layer count filled in (uniform, 1) and checked."""
        if self.recompute_granularity != "full":
            return self
        k = self.recompute_num_layers or 1
        if not 1 <= k <= num_layers:
            raise UsageError(
                f"--recompute-num-layers {k} must be between 1 and --num-layers {num_layers}"
            )
        return replace(
            self, recompute_method=self.recompute_method or "uniform", recompute_num_layers=k
        )

    def for_device(self, device: torch.device) -> ImplConfig:
        """The Triton fast paths turned off where their kernels cannot run (logged once)."""
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            return self
        off = {name: False for name in TRITON_FAST_PATHS if getattr(self, name)}
        if off:
            _log_turned_off(device.type, tuple(TRITON_FAST_PATHS[name] for name in off))
        return replace(self, **off)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ImplConfig:
        """The switches of validated arguments."""
        if args.use_flash_attn and args.use_flash_attn_triton:
            raise UsageError(
                "--use-flash-attn and --use-flash-attn-triton were both given; choose one"
            )
        backend = (
            "triton" if args.use_flash_attn_triton else "sdpa" if args.use_flash_attn else "classic"
        )
        return cls(
            attention_backend=backend,
            sdpa_block_size=args.sdpa_block_size,
            loss_chunk_size=args.loss_chunk_size,
            cross_entropy_fusion=args.cross_entropy_loss_fusion,
            loss_grad_in_forward=not args.no_loss_grad_in_forward,
            embedding_grads_in_place=not args.no_embedding_grads_in_place,
            bias_gelu_fusion=not args.no_bias_gelu_fusion,
            fused_residual_norm=args.fused_residual_norm,
            bias_dropout_fusion=not args.no_bias_dropout_fusion,
            fp32_residual_connection=args.fp32_residual_connection,
            delay_wgrad_compute=args.delay_wgrad_compute,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
            checkpoint_in_cpu=args.checkpoint_in_cpu,
            sp_rank_major_qkv=not args.no_sp_rank_major_qkv,
            tiled_mlp_chunk_size=args.tiled_mlp_chunk_size,
        )


@cache
def _log_turned_off(device_type: str, flags: tuple[str, ...]) -> None:
    logger.info(
        "> fast paths off on %s (their Triton kernels need CUDA or TRITON_INTERPRET=1): %s",
        device_type,
        " ".join(flags),
    )
