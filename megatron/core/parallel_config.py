"""ParallelConfig: how a run is spread over processes and devices, built once at start-up.

A frozen dataclass made from the validated arguments (:meth:`ParallelConfig.from_args`);
``initialize_megatron`` starts torch.distributed and builds the process groups from it, and
the training loop reads its ZeRO and overlap switches. The groups themselves live in
:mod:`megatron.core.parallel_state`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from megatron.errors import UsageError


def zero_gather_dtype(params_dtype: torch.dtype, fp32_param_gather: bool) -> torch.dtype | None:
    """The dtype ZeRO all-gathers the transformer layers' weights in: the compute dtype under
    --bf16/--fp16 (unless --fp32-param-gather), else None (fp32, as stored)."""
    if params_dtype == torch.float32 or fp32_param_gather:
        return None
    return params_dtype


@dataclass(frozen=True)
class ParallelConfig:
    """Process layout, devices, ZeRO and the communication-overlap switches of a run."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device  # this process's device (cuda:<local rank> or cpu)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel_size: int = 1  # --ds-sequence-parallel-size (Ulysses)
    context_parallel_size: int = 1  # --context-parallel-size (ring)
    data_parallel_size: int = 1  # world size / (TP x PP x CP x SP)
    zero_stage: int = 0
    # The dtype ZeRO all-gathers the layers' weights in (None: fp32, as stored).
    zero_param_dtype: torch.dtype | None = None
    overlap_param_gather: bool = True  # FSDP2 forward prefetch of the next layer's weights
    # The first all-gathers of the next step during the optimizer step.
    overlap_param_gather_with_optimizer_step: bool = True
    # ZeRO 1 over several micro-batches: deferred weight-gradient GEMMs accumulate in fp32.
    gradient_accumulation_fusion: bool = True
    distributed_backend: str = "gloo"  # nccl on CUDA unless --distributed-backend says
    distributed_timeout_minutes: int = 10

    def __post_init__(self) -> None:
        model = (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
            * self.sequence_parallel_size
        )
        if model * self.data_parallel_size != self.world_size:
            raise UsageError(
                f"parallel layout: TP {self.tensor_model_parallel_size} x PP "
                f"{self.pipeline_model_parallel_size} x CP {self.context_parallel_size} x SP "
                f"{self.sequence_parallel_size} x DP "
                f"{self.data_parallel_size} is not the world size {self.world_size}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise UsageError(f"--zero-stage {self.zero_stage}: expected 0, 1, 2 or 3")

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, distributed_backend: str | None = None
    ) -> ParallelConfig:
        """The layout of validated arguments (``args.device_obj`` set by start-up);
        ``distributed_backend`` overrides the flag's backend (start-up passes
        ``cpu:gloo,cuda:nccl`` when tensors are offloaded to the host)."""
        device = torch.device(args.device_obj)
        return cls(
            world_size=args.world_size,
            rank=args.rank,
            local_rank=args.local_rank,
            device=device,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            sequence_parallel_size=args.ds_sequence_parallel_size,
            context_parallel_size=args.context_parallel_size,
            data_parallel_size=args.data_parallel_size,
            zero_stage=args.zero_stage,
            zero_param_dtype=zero_gather_dtype(args.params_dtype, args.fp32_param_gather),
            overlap_param_gather=not args.no_overlap_param_gather,
            # --no-overlap-param-gather implies the other (the flag's help says so).
            overlap_param_gather_with_optimizer_step=not (
                args.no_overlap_param_gather or args.no_overlap_param_gather_with_optimizer_step
            ),
            gradient_accumulation_fusion=not args.no_gradient_accumulation_fusion,
            distributed_backend=distributed_backend
            or args.distributed_backend
            or ("nccl" if device.type == "cuda" else "gloo"),
            distributed_timeout_minutes=args.distributed_timeout_minutes,
        )


_CONFIG: ParallelConfig | None = None


def set_parallel_config(config: ParallelConfig | None) -> None:
    """Keep the run's layout (``initialize_megatron`` sets it once)."""
    global _CONFIG
    _CONFIG = config


def get_parallel_config() -> ParallelConfig:
    """The layout ``initialize_megatron`` built from the validated arguments."""
    if _CONFIG is None:
        raise RuntimeError(
            "the parallel configuration is not set: call megatron.initialize.initialize_megatron first"
        )
    return _CONFIG
