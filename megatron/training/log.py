"""Megatron's iteration and validation lines, and the TensorBoard scalars."""

from __future__ import annotations

import argparse
import logging
import math

import torch

logger = logging.getLogger("megatron")


def iteration_line(
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    consumed_tokens: int,
    elapsed_ms: float,
    lr: float,
    global_batch_size: int,
    losses: dict[str, float],
    loss_scale: float,
    grad_norm: float | None,
    seq_length: int,
    skipped: int,
    nan_iters: int,
    world_size: int,
    tflops: float,
    peak_mem_gb: float | None,
    eta_s: float | None,
    ulysses: int = 1,
    ring: int = 1,
) -> str:
    """The line existing Megatron log parsers read, plus the sequence sharding (Ulysses
    degree x ring degree), peak memory and an ETA."""
    seconds = elapsed_ms / 1000.0
    parts = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"consumed tokens: {consumed_tokens:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"learning rate: {lr:.3E}",
        f"global batch size: {global_batch_size:5d}",
    ]
    parts += [f"{name}: {value:.6E}" for name, value in losses.items()]
    parts += [
        f"loss scale: {loss_scale:.1f}",
        f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: nan",
        f"actual seqlen: {seq_length:5d}",
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {nan_iters:3d}",
        f"samples per second: {global_batch_size / seconds:.3f}",
        f"tokens per gpu per second (tgs): {global_batch_size * seq_length / seconds / world_size:.3f}",
        f"TFLOPs: {tflops:.2f}",
        f"Ulysses x ring: {ulysses} x {ring}",
    ]
    if peak_mem_gb is not None:
        parts.append(f"peak memory (GB): {peak_mem_gb:.2f}")
    if eta_s is not None:
        parts.append(f"ETA: {_hms(eta_s)}")
    return " | ".join(parts) + " |"


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def validation_line(prefix: str, iteration_desc: str, losses: dict[str, float]) -> str:
    parts = [f" {prefix} loss at {iteration_desc}"]
    for name, value in losses.items():
        parts.append(f"{name} value: {value:.6E}")
        parts.append(f"{name} PPL: {math.exp(min(20.0, value)):.6E}")
    return " | ".join(parts) + " |"


class TensorBoardLogger:
    """Scalars to ``--tensorboard-dir`` (rank 0 only); a no-op without the flag."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.args = args
        self.writer = None
        if args.tensorboard_dir and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size
            )
        self.wandb = None
        if args.wandb_project and rank == 0:
            try:
                import wandb
            except ImportError:
                logger.warning(
                    "WARNING: --wandb-project given but wandb is not installed; not logging to wandb"
                )
            else:
                self.wandb = wandb.init(
                    project=args.wandb_project,
                    name=args.wandb_exp_name,
                    dir=args.wandb_save_dir,
                    config=vars(args),
                )

    @property
    def active(self) -> bool:
        """Whether anything is written (TensorBoard or wandb, on rank 0)."""
        return self.writer is not None or self.wandb is not None

    def training(
        self,
        iteration: int,
        samples: int,
        tokens: int,
        scalars: dict[str, float],
        timers: dict[str, float],
    ) -> None:
        if self.writer is None and self.wandb is None:
            return
        a = self.args
        keep = dict(scalars)
        if not a.log_learning_rate_to_tensorboard:
            keep.pop("learning-rate", None)
        if not a.log_loss_scale_to_tensorboard:
            keep.pop("loss-scale", None)
        if not a.log_batch_size_to_tensorboard:
            keep.pop("batch-size", None)
        if not a.log_memory_to_tensorboard:
            keep.pop("mem-max-allocated-bytes", None)
        if a.log_world_size_to_tensorboard:
            keep["world-size"] = a.world_size
        if self.writer is not None:
            for name, value in keep.items():
                self.writer.add_scalar(name, value, iteration)
                self.writer.add_scalar(name + " vs samples", value, samples)
                self.writer.add_scalar(name + " vs tokens", value, tokens)
            if a.log_timers_to_tensorboard:
                for name, value in timers.items():
                    self.writer.add_scalar(name + "-time", value, iteration)
        if self.wandb is not None:
            self.wandb.log(keep, step=iteration)

    def validation(
        self, iteration: int, samples: int, tokens: int, losses: dict[str, float]
    ) -> None:
        if self.writer is None:
            return
        for name, value in losses.items():
            self.writer.add_scalar(f"{name} validation", value, iteration)
            self.writer.add_scalar(f"{name} validation vs samples", value, samples)
            self.writer.add_scalar(f"{name} validation vs tokens", value, tokens)
            if self.args.log_validation_ppl_to_tensorboard:
                ppl = math.exp(min(20.0, value))
                self.writer.add_scalar(f"{name} validation ppl", ppl, iteration)
                self.writer.add_scalar(f"{name} validation ppl vs samples", ppl, samples)
                self.writer.add_scalar(f"{name} validation ppl vs tokens", ppl, tokens)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None
