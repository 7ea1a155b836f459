"""Learning-rate and weight-decay schedule with Megatron's semantics.

Steps are counted in SAMPLES: the training loop calls ``step(increment=global_batch_size)``
once per iteration, so iteration-, sample- and token-based flags all become sample counts
(:func:`get_optimizer_param_scheduler`). The state dict holds plain python numbers and strings
only, so a checkpoint can store it as JSON.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

import torch

from megatron.errors import UsageError

logger = logging.getLogger(__name__)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")

# Scheduler attribute -> (what it is, the flags that set it), for load-time mismatch messages.
_FIELDS = {
    "init_lr": ("initial warm-up learning rate", "--lr-warmup-init"),
    "max_lr": ("learning rate", "--lr"),
    "min_lr": ("minimum learning rate", "--min-lr"),
    "lr_warmup_steps": (
        "warm-up length in samples",
        "--lr-warmup-iters/-samples/-tokens/-fraction",
    ),
    "lr_decay_steps": ("decay length in samples", "--lr-decay-iters/-samples/-tokens"),
    "lr_decay_style": ("learning-rate decay style", "--lr-decay-style"),
    "start_wd": ("start weight decay", "--start-weight-decay"),
    "end_wd": ("end weight decay", "--end-weight-decay"),
    "wd_incr_steps": ("weight-decay increment length in samples", "--train-iters/--train-samples"),
    "wd_incr_style": ("weight-decay increment style", "--weight-decay-incr-style"),
}
# Older Megatron checkpoints spell some keys differently; the first key found wins.
_LEGACY_KEYS = {
    "max_lr": ("max_lr", "start_lr"),
    "lr_warmup_steps": ("lr_warmup_steps", "warmup_iter", "warmup_steps"),
    "lr_decay_steps": ("lr_decay_steps", "end_iter", "decay_steps"),
    "lr_decay_style": ("lr_decay_style", "decay_style"),
    "num_steps": ("num_steps", "num_iters"),
}


class OptimizerParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of every param group from the number of samples seen.

    Learning rate: linear warm-up from ``init_lr`` to ``max_lr`` over ``lr_warmup_steps``, then
    ``constant`` (``max_lr`` forever), ``linear`` / ``cosine`` decay to ``min_lr`` at
    ``lr_decay_steps``, or ``inverse-square-root`` (``max_lr * sqrt(warmup / step)``, floored at
    ``min_lr``); ``min_lr`` beyond ``lr_decay_steps`` for every decaying style. Weight decay goes
    from ``start_wd`` to ``end_wd`` over ``wd_incr_steps``. A group's optional ``lr_mult`` and
    ``wd_mult`` (0 for biases and norms) multiply the values.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: float,
        lr_decay_steps: float,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: float,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.init_lr = init_lr
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.start_wd = start_wd
        self.end_wd = end_wd
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.num_steps = 0
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self._validate()
        self.step(0)
        logger.info("> learning rate decay style: %s", self.lr_decay_style)

    def _validate(self) -> None:
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise UsageError(
                "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler were both "
                "given; choose one"
            )
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise UsageError(
                f"--lr-decay-style {self.lr_decay_style}: expected one of {', '.join(LR_DECAY_STYLES)}"
            )
        if self.wd_incr_style not in WD_INCR_STYLES:
            raise UsageError(
                f"--weight-decay-incr-style {self.wd_incr_style}: expected one of "
                f"{', '.join(WD_INCR_STYLES)}"
            )
        if self.min_lr < 0.0:
            raise UsageError(f"--min-lr {self.min_lr} must be >= 0")
        if self.max_lr < self.min_lr:
            raise UsageError(f"--lr {self.max_lr} is smaller than --min-lr {self.min_lr}")
        if not 0.0 <= self.init_lr <= self.max_lr:
            raise UsageError(f"--lr-warmup-init {self.init_lr} must be in [0, --lr {self.max_lr}]")
        if self.lr_decay_steps <= 0:
            raise UsageError(
                f"the learning-rate decay length is {self.lr_decay_steps} samples; give a positive "
                "--lr-decay-iters/-samples/-tokens (or --train-iters/--train-samples)"
            )
        if self.lr_warmup_steps < 0 or self.lr_warmup_steps >= self.lr_decay_steps:
            raise UsageError(
                f"the warm-up ({self.lr_warmup_steps} samples) must be >= 0 and shorter than the "
                f"decay ({self.lr_decay_steps} samples); lower --lr-warmup-iters/-samples/-tokens/"
                "-fraction or raise --lr-decay-iters/-samples/-tokens"
            )
        if self.start_wd < 0.0:
            raise UsageError(f"--start-weight-decay {self.start_wd} must be >= 0")
        if self.end_wd < self.start_wd:
            raise UsageError(
                f"--end-weight-decay {self.end_wd} is smaller than --start-weight-decay {self.start_wd}"
            )
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise UsageError(
                f"--weight-decay-incr-style constant needs --start-weight-decay ({self.start_wd}) "
                f"equal to --end-weight-decay ({self.end_wd}); use linear or cosine to change it"
            )
        if self.wd_incr_style != "constant" and self.wd_incr_steps <= 0:
            raise UsageError(
                f"--weight-decay-incr-style {self.wd_incr_style} needs a positive training length "
                f"(--train-iters/--train-samples), got {self.wd_incr_steps} samples"
            )

    def get_wd(self) -> float:
        """Weight decay after ``num_steps`` samples."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        incr_ratio = float(self.num_steps) / float(self.wd_incr_steps)
        if self.wd_incr_style == "linear":
            coeff = incr_ratio
        else:  # cosine: slow start, slow finish
            coeff = 0.5 * (math.cos(math.pi * (1.0 - incr_ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self) -> float:
        """Learning rate after ``num_steps`` samples (before a group's ``lr_mult``)."""
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * (
                float(self.num_steps) / float(self.lr_warmup_steps)
            )
        if self.lr_decay_style == "constant":
            return self.max_lr
        if self.num_steps > self.lr_decay_steps:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup_steps = max(self.lr_warmup_steps, 1)
            num_steps = max(self.num_steps, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warmup_steps) / math.sqrt(num_steps))
        decay_ratio = float(self.num_steps - self.lr_warmup_steps) / float(
            self.lr_decay_steps - self.lr_warmup_steps
        )
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> None:
        """Advance by ``increment`` samples and write lr / weight decay into every param group."""
        self.num_steps += increment
        self._apply()

    def _apply(self) -> None:
        new_lr = self.get_lr()
        new_wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = new_lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = new_wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict[str, Any]:
        """Plain python numbers and strings (JSON-safe); Megatron's keys plus ``init_lr``."""
        state: dict[str, Any] = {name: getattr(self, name) for name in _FIELDS}
        state["num_steps"] = self.num_steps
        return state

    def _check_and_set(self, name: str, cls_value: Any, sd_value: Any) -> Any:
        """Megatron's rule: override -> command line; use-checkpoint -> checkpoint; else must agree."""
        what, flag = _FIELDS[name]
        if self.override_opt_param_scheduler:
            logger.info(" > overriding %s value to %s", what, cls_value)
            return cls_value
        if not self.use_checkpoint_opt_param_scheduler and cls_value != sd_value:
            raise UsageError(
                f"the checkpoint's {what} is {sd_value} but the command line ({flag}) gives "
                f"{cls_value}; pass --use-checkpoint-opt_param-scheduler to keep the checkpoint's "
                "schedule or --override-opt_param-scheduler to use the command line's"
            )
        logger.info(" > using checkpoint value %s for %s", sd_value, what)
        return sd_value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (``num_steps``) and reconcile the schedule with the checkpoint."""
        for name in _FIELDS:
            keys = _LEGACY_KEYS.get(name, (name,))
            key = next((k for k in keys if k in state_dict), None)
            if key is None:  # e.g. no init_lr / weight-decay fields in older checkpoints
                continue
            setattr(self, name, self._check_and_set(name, getattr(self, name), state_dict[key]))
        num_key = next((k for k in _LEGACY_KEYS["num_steps"] if k in state_dict), None)
        if num_key is None:
            raise UsageError(
                "the checkpoint's scheduler state has no num_steps; it is not a scheduler state "
                "dict (or is damaged): load another checkpoint or pass --no-load-optim"
            )
        self.num_steps = state_dict[num_key]
        self._validate()
        self._apply()


def _samples_from_tokens(tokens: int, args: argparse.Namespace, flag: str) -> float:
    """Tokens as a (fractional) number of samples: every sample has --seq-length tokens, so
    the schedule over samples is Megatron-DeepSpeed's schedule over consumed tokens exactly."""
    seq_length = getattr(args, "seq_length", None)
    if not seq_length or seq_length <= 0:
        raise UsageError(f"{flag} {tokens} needs --seq-length to convert tokens to samples")
    return tokens / seq_length


def _schedule_lengths(args: argparse.Namespace) -> tuple[float, float, float]:
    """(warm-up, decay, weight-decay increment) lengths in samples, as Megatron(-DeepSpeed)."""
    warmup_iters = args.lr_warmup_iters or 0
    warmup_samples = args.lr_warmup_samples or 0
    if args.lr_warmup_fraction is not None and (warmup_iters or warmup_samples):
        raise UsageError(
            "--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples were both given; choose one"
        )
    if args.train_iters:
        if args.lr_decay_samples is not None or warmup_samples:
            raise UsageError(
                "--lr-decay-samples/--lr-warmup-samples go with --train-samples; with --train-iters "
                "use --lr-decay-iters/--lr-warmup-iters"
            )
        gbs = args.global_batch_size
        decay = (args.lr_decay_iters or args.train_iters) * gbs
        wd_incr = args.train_iters * gbs
        warmup: float = warmup_iters * gbs
    elif args.train_samples:
        if args.lr_decay_iters is not None or warmup_iters:
            raise UsageError(
                "--lr-decay-iters/--lr-warmup-iters go with --train-iters; with --train-samples "
                "use --lr-decay-samples/--lr-warmup-samples (or the -tokens forms)"
            )
        decay = args.lr_decay_samples or args.train_samples
        wd_incr = args.train_samples
        warmup = warmup_samples
    elif getattr(args, "train_tokens", None):
        if args.lr_decay_iters is not None or warmup_iters:
            raise UsageError(
                "--lr-decay-iters/--lr-warmup-iters go with --train-iters; with --train-tokens "
                "use --lr-decay-tokens/--lr-warmup-tokens (or -samples)"
            )
        wd_incr = _samples_from_tokens(args.train_tokens, args, "--train-tokens")
        decay = args.lr_decay_samples or wd_incr
        warmup = warmup_samples
    else:
        raise UsageError(
            "--train-iters, --train-samples or --train-tokens is required to size the learning "
            "rate schedule"
        )

    # Megatron-DeepSpeed's token-based schedule; with a fixed --seq-length it is sample-based.
    decay_tokens = getattr(args, "lr_decay_tokens", None)
    if decay_tokens is not None:
        if args.lr_decay_iters is not None or args.lr_decay_samples is not None:
            raise UsageError(
                "--lr-decay-tokens and --lr-decay-iters/--lr-decay-samples were both given; choose one"
            )
        decay = _samples_from_tokens(decay_tokens, args, "--lr-decay-tokens")
    warmup_tokens = getattr(args, "lr_warmup_tokens", None)
    if warmup_tokens is not None:
        if args.lr_warmup_fraction is not None or warmup_iters or warmup_samples:
            raise UsageError(
                "--lr-warmup-tokens and --lr-warmup-fraction/-iters/-samples were both given; "
                "choose one"
            )
        warmup = _samples_from_tokens(warmup_tokens, args, "--lr-warmup-tokens")
    elif args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return warmup, decay, wd_incr


def get_optimizer_param_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace
) -> OptimizerParamScheduler:
    """Build the scheduler from the flags, converting iterations and tokens to samples.

    ``args``: a ``TrainingConfig`` (as the training loop passes) or the validated arguments,
    whose fields have the same names."""
    if args.lr is None:
        raise UsageError("--lr is required")
    warmup, decay, wd_incr = _schedule_lengths(args)
    start_wd = args.start_weight_decay
    end_wd = args.end_weight_decay
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay if start_wd is None else start_wd,
        end_wd=args.weight_decay if end_wd is None else end_wd,
        wd_incr_steps=wd_incr,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )
