"""TrainingConfig: what the training loop does, built once from the validated arguments.

Length, batch sizes, the log/eval/save/exit intervals, precision and loss scaling, gradient
clipping, the optimizer and its learning-rate and weight-decay schedule. Each field is named
and means exactly what its flag does (``--lr-warmup-iters`` is ``lr_warmup_iters``), so the
optimizer and scheduler builders take it where they took the arguments. The architecture is
:class:`~megatron.model.ModelConfig`, the process layout
:class:`~megatron.core.parallel_config.ParallelConfig`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TrainingConfig:
    """The training loop's settings; frozen, one field per flag (same name and meaning)."""

    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    # length of training: one of these (--train-tokens may stop earlier)
    train_iters: int | None = None
    train_samples: int | None = None
    train_tokens: int | None = None
    rampup_batch_size: tuple[str, ...] | None = None  # START INCREMENT SAMPLES, as given
    # intervals
    log_interval: int = 100
    tensorboard_log_interval: int = 100  # validation sets it to --log-interval when not given
    eval_interval: int = 1000
    eval_iters: int = 100
    save: str | None = None
    save_interval: int | None = None
    exit_interval: int | None = None
    exit_duration_in_mins: int | None = None
    exit_signal_handler: bool = False
    max_nan_iterations: int = 3
    seed: int = 1234
    finetune: bool = False
    skip_train: bool = False  # evaluate (and test) the loaded model only
    # precision: the compute dtype (autocast; the weights stay fp32) and fp16 loss scaling
    params_dtype: torch.dtype = torch.float32
    fp16: bool = False
    bf16: bool = False
    loss_scale: float | None = None  # static scale; dynamic when None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000
    hysteresis: int = 2
    loss_scale_consecutive_hysteresis: bool = False  # from --deepspeed_config's fp16 block
    clip_grad: float = 1.0
    # optimizer
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    # host offload (--cpu-optimizer / --optimizer-cpu-offload: AdamW's state and step on the
    # host; --cpu-offload-params: FSDP2 keeps parameters and gradients there too)
    cpu_optimizer: bool = False
    optimizer_cpu_offload: bool = False
    cpu_offload_params: bool = False
    offload_pin_memory: bool = True
    # learning-rate and weight-decay schedule
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    lr_decay_samples: int | None = None
    lr_decay_tokens: int | None = None
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_warmup_tokens: int | None = None
    start_weight_decay: float | None = None
    end_weight_decay: float | None = None
    weight_decay_incr_style: str = "constant"
    use_checkpoint_opt_param_scheduler: bool = False
    override_opt_param_scheduler: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The settings of validated arguments (``validate_args`` derived the batch sizes and
        ``params_dtype``)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        if values["rampup_batch_size"] is not None:
            values["rampup_batch_size"] = tuple(values["rampup_batch_size"])
        return cls(**values)
