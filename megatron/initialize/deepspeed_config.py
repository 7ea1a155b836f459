"""``--deepspeed_config``: every field is honoured, refused, or named in one warning.

The JSON's field names are checked against DeepSpeed's documented ones
(:mod:`megatron.initialize.deepspeed_keys`); a name DeepSpeed does not document is an error
(a typo would otherwise change nothing). Then each field is

- honoured: it sets the matching flag (batch sizes, ZeRO stage, clipping, precision and the
  fp16 loss scaler, optimizer and scheduler, activation checkpointing in CPU, TensorBoard).
  A flag given on the command line with another value is an error naming both values;
- refused: it asks for something not built here (``REFUSED``, the offload fields);
- listed: it changes nothing here (``NO_EFFECT``, ``SECTION_NO_EFFECT``); all such fields
  share one start-up warning.

A field at DeepSpeed's default value, or inside a block that is off (``"enabled": false``),
asks for nothing and is accepted quietly.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from megatron.errors import UsageError
from megatron.initialize.deepspeed_keys import SECTIONS, TOP_LEVEL, UNSET
from megatron.initialize.long_context_args import apply_offload_fields

# Top-level fields refused when set: what they ask for is not built.
REFUSED = {
    "amp": "Apex AMP is not used; use --fp16 or --bf16 (torch.autocast)",
    "torch_autocast": "use --fp16 or --bf16 (torch.autocast over fp32 weights)",
    "tensor_parallel": "tensor parallelism is not built",
    "expert_parallel": "mixture-of-experts layers are not built",
    "hybrid_engine": "the RLHF hybrid engine is not built",
    "pipeline": "pipeline parallelism is not built",
    "sparse_attention": "sparse attention is not built",
    "elasticity": "elastic training is not built",
    "compression_training": "compression training is not built",
    "data_efficiency": "data sampling and routing are not built",
    "curriculum_learning": "curriculum learning is not built",
    "progressive_layer_drop": "progressive layer drop is not built",
    "gradient_allreduce_op": "gradients are averaged over the data-parallel ranks",
}

# Top-level fields that change nothing here.
NO_EFFECT = {
    "managed_gradient_accumulation": "the training loop steps once per global batch",
    "zero_allow_untested_optimizer": "the optimizer is this project's AdamW or SGD",
    "zero_force_ds_cpu_optimizer": "no DeepSpeed CPU optimizer is used",
    "communication_data_type": "gradients are reduced in fp32",
    "seq_parallel_communication_data_type": "the all-to-alls carry the compute dtype",
    "prescale_gradients": "gradients are reduced in fp32, where dividing before or after the "
    "sum gives the same result",
    "gradient_predivide_factor": "gradients are reduced in fp32, where dividing before or after "
    "the sum gives the same result",
    "sparse_gradients": "the embedding's gradient is dense",
    "disable_allgather": "ZeRO's all-gathers are FSDP2's",
    "data_types": "gradients are accumulated in fp32",
    "aio": "there is no NVMe offload",
    "wall_clock_breakdown": "no per-phase timers; the iteration line gives the step time",
    "memory_breakdown": "the iteration line gives the peak memory",
    "dump_state": "the arguments are logged and saved with each checkpoint",
    "log_level": "logging follows Python's logging module",
    "flops_profiler": "the iteration line reports TFLOPs from the model's formula",
    "wandb": "use --wandb-project",
    "comet": "Comet logging is not built",
    "csv_monitor": "CSV logging is not built; use --tensorboard-dir",
    "comms_logger": "communication logging is not built; use the PyTorch profiler",
    "autotuning": "the autotuner is not built; size a run with tools/estimate_memory.py",
    "eigenvalue": "eigenvalue estimation is not built",
    "checkpoint": "checkpoints are torch.distributed.checkpoint directories",
    "dataloader_drop_last": "the sampler always drops the last incomplete batch",
    "use_data_before_expert_parallelism": "there is no expert parallelism",
    "graph_harvesting": "CUDA graphs are not captured",
}

_ZERO_WHY = "ZeRO runs through FSDP2, which sizes its own buckets, prefetch and partitions"
# Fields of a block that change nothing here (the block's other fields are honoured).
SECTION_NO_EFFECT = {
    "fp16": {
        "auto_cast": "torch.autocast casts every op's inputs already",
        "fp16_master_weights_and_grads": "weights and gradients are kept in fp32",
    },
    "bf16": {
        "immediate_grad_update": "gradients are accumulated in fp32 in place",
        "check_grad_overflow": "non-finite gradients are always detected (--max-nan-iterations)",
        "bf16_master_weights_and_grads": "weights and gradients are kept in fp32",
        "bf16_optimizer_states": "optimizer states are kept in fp32",
    },
    "optimizer": {"legacy_fusion": "the optimizer is this project's AdamW or SGD"},
    "zero_optimization": {
        name: _ZERO_WHY
        for name in SECTIONS["zero_optimization"]
        if name != "stage" and not name.startswith(("offload_", "cpu_offload"))
    },
    "activation_checkpointing": {
        "partition_activations": "there is no tensor parallelism to partition over",
        "contiguous_memory_optimization": "recomputed inputs are plain tensors",
        "number_checkpoints": "recomputed inputs are plain tensors",
        "synchronize_checkpoint_boundary": "no synchronisation is inserted",
        "profile": "recomputation is not timed separately",
    },
}
OFFLOAD_FIELDS = (
    "offload_optimizer",
    "offload_param",
    "cpu_offload",
    "cpu_offload_param",
    "cpu_offload_use_pin_memory",
)
# Fields read by the handlers below, block by block.
HONOURED = {
    "top": (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "steps_per_print",
        "fp16",
        "bf16",
        "optimizer",
        "scheduler",
        "zero_optimization",
        "activation_checkpointing",
        "tensorboard",
    ),
    "fp16": (
        "enabled",
        "loss_scale",
        "initial_scale_power",
        "loss_scale_window",
        "hysteresis",
        "consecutive_hysteresis",
        "min_loss_scale",
    ),
    "bf16": ("enabled",),
    "optimizer": ("type", "params"),
    "scheduler": ("type", "params"),
    "zero_optimization": ("stage", *OFFLOAD_FIELDS),
    "activation_checkpointing": ("cpu_checkpointing",),
    "tensorboard": ("enabled", "output_path", "job_name"),
}

_ADAM_PARAMS = {"lr": "lr", "eps": "adam_eps", "weight_decay": "weight_decay"}
_SGD_PARAMS = {"lr": "lr", "momentum": "sgd_momentum", "weight_decay": "weight_decay"}
_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None), str)) else str(value)


def _active(value, default=UNSET) -> bool:
    """Whether a field asks for something: a block that is not empty, not ``"enabled":
    false`` and not an offload to ``"device": "none"``; a value other than DeepSpeed's
    default (without a default: other than null or false)."""
    if isinstance(value, dict):
        if not value or value.get("enabled", True) is False:
            return False
        return value.get("device") != "none"
    if default is UNSET:
        return value is not None and value is not False
    return value != default


class _Config:
    """One JSON config applied to the arguments; ``notes`` collects the listed fields."""

    def __init__(self, args: argparse.Namespace, cfg: dict, defaults: Callable[[str], object]):
        self.args, self.cfg, self.path = args, cfg, args.deepspeed_config
        self._default = defaults
        self.notes: list[str] = []
        self.lines: list[str] = []  # whole lines to log once (the offload mapping's)

    def error(self, what: str) -> UsageError:
        return UsageError(f"--deepspeed_config {self.path}: {what}")

    def given(self, dest: str) -> bool:
        """Whether the command line set ``dest`` (without a record: differs from the default)."""
        given = getattr(self.args, "flags_given", None)
        if given is not None:
            return dest in given
        return getattr(self.args, dest) not in (None, self._default(dest))

    def merge(self, field: str, dest: str, value, shown=None) -> None:
        """Set ``dest`` from the field unless the command line set another value (an error)."""
        current = getattr(self.args, dest)
        if self.given(dest) and current is not None:
            if current != value:
                raise self.error(
                    f"sets {field}={shown if shown is not None else _show(value)} but {_flag(dest)} is "
                    f"{_show(current)}; make them agree or drop one"
                )
            return
        setattr(self.args, dest, value)

    def note(self, field: str, value, why: str) -> None:
        self.notes.append(
            f"{field}={_show(value) if not isinstance(value, dict) else '{...}'} ({why})"
        )


def _check_names(c: _Config) -> None:
    if not isinstance(c.cfg, dict):
        raise c.error("the top level is not a JSON object")
    for name, value in c.cfg.items():
        if name not in TOP_LEVEL:
            raise c.error(
                f"{name!r} is not a DeepSpeed config field (see DeepSpeed's config-json "
                "reference); fix its spelling or remove it"
            )
        if name in SECTIONS and value is not None:
            if not isinstance(value, dict):
                raise c.error(f"{name} must be a JSON object, got {_show(value)}")
            unknown = sorted(set(value) - set(SECTIONS[name]))
            if unknown:
                raise c.error(
                    f"{name}.{unknown[0]} is not a DeepSpeed field of {name} (documented: "
                    f"{', '.join(sorted(SECTIONS[name]))}); fix its spelling or remove it"
                )


def _offload_fields(c: _Config) -> None:
    """ZeRO's offload fields: ``offload_optimizer`` / ``offload_param`` map to the CPU
    offload flags (:func:`~megatron.initialize.long_context_args.apply_offload_fields`);
    the older ``cpu_offload*`` spellings are refused with the current names."""
    zero = c.cfg.get("zero_optimization") or {}
    for name in OFFLOAD_FIELDS[2:]:
        if _active(zero.get(name)):
            raise c.error(
                f"zero_optimization.{name} is DeepSpeed's old spelling; use "
                'zero_optimization.offload_optimizer / offload_param ({"device": "cpu"}) or '
                "the CPU offload flags (--cpu-optimizer, --cpu-offload-params)"
            )
    c.lines += apply_offload_fields(zero, c.args, c.path)


def _batch(c: _Config) -> None:
    cfg, a = c.cfg, c.args
    if "train_micro_batch_size_per_gpu" in cfg:
        c.merge(
            "train_micro_batch_size_per_gpu",
            "micro_batch_size",
            int(cfg["train_micro_batch_size_per_gpu"]),
        )
    if "train_batch_size" in cfg:
        c.merge("train_batch_size", "global_batch_size", int(cfg["train_batch_size"]))
    if "gradient_accumulation_steps" not in cfg:
        return
    gas, dp = int(cfg["gradient_accumulation_steps"]), a.data_parallel_size
    if a.global_batch_size is None and a.micro_batch_size is not None:
        a.global_batch_size = a.micro_batch_size * gas * dp
    elif a.micro_batch_size is None and a.global_batch_size is not None:
        a.micro_batch_size = a.global_batch_size // (gas * dp)
    if a.micro_batch_size and a.global_batch_size:
        have = a.global_batch_size // (a.micro_batch_size * dp)
        if have != gas:
            raise c.error(
                f"sets gradient_accumulation_steps={gas} but the batch flags give {have} (global "
                f"{a.global_batch_size} / (micro {a.micro_batch_size} x DP {dp}))"
            )


def _precision(c: _Config) -> None:
    a = c.args
    for block, other in (("fp16", "bf16"), ("bf16", "fp16")):
        if "enabled" not in (c.cfg.get(block) or {}):
            continue
        enabled = c.cfg[block]["enabled"]
        on = enabled in (True, "true", "auto")
        if on and getattr(a, other):
            raise c.error(
                f"sets {block}.enabled={_show(enabled)} but --{other} was given; choose one"
            )
        if not on and getattr(a, block) and c.given(block):
            raise c.error(
                f"sets {block}.enabled={_show(enabled)} but --{block} was given; make them agree"
            )
        if on:
            setattr(a, block, True)
    fp16 = c.cfg.get("fp16") or {}
    if not a.fp16 or fp16.get("enabled") is False:
        return  # the loss scaler is off: its fields ask for nothing
    if "loss_scale" in fp16:
        scale = float(fp16["loss_scale"])
        if scale > 0:
            c.merge("fp16.loss_scale", "loss_scale", scale)
        elif a.loss_scale is not None:
            raise c.error(
                f"sets fp16.loss_scale=0 (dynamic) but --loss-scale is {a.loss_scale}; make them "
                "agree or drop one"
            )
    if "initial_scale_power" in fp16:
        power = int(fp16["initial_scale_power"])
        c.merge(
            "fp16.initial_scale_power",
            "initial_loss_scale",
            2.0**power,
            f"{power} (2^{power} = {2.0**power:g})",
        )
    if "loss_scale_window" in fp16:
        c.merge("fp16.loss_scale_window", "loss_scale_window", float(fp16["loss_scale_window"]))
    if "hysteresis" in fp16:
        c.merge("fp16.hysteresis", "hysteresis", int(fp16["hysteresis"]))
    if "min_loss_scale" in fp16:
        c.merge("fp16.min_loss_scale", "min_loss_scale", float(fp16["min_loss_scale"]))
    a.loss_scale_consecutive_hysteresis = bool(fp16.get("consecutive_hysteresis", False))


def _optimizer(c: _Config) -> None:
    block = c.cfg.get("optimizer")
    if not block:
        return
    a = c.args
    kind = str(block.get("type", "")).lower()
    params = dict(block.get("params") or {})
    if kind in ("adam", "adamw"):
        if params.pop("adam_w_mode", True) is not True:
            raise c.error(
                "optimizer.params.adam_w_mode=false asks for Adam with L2 regularisation; only "
                "AdamW (decoupled weight decay) is built: remove the field"
            )
        params.pop("torch_adam", None)  # which AdamW implementation: fused on GPU here
        if c.given("optimizer") and a.optimizer not in ("adam", "adamw"):
            raise c.error(
                f"sets optimizer.type={block['type']} but --optimizer is {a.optimizer}; make them agree"
            )
        if not c.given("optimizer"):
            a.optimizer = kind
        names = _ADAM_PARAMS
        if "betas" in params:
            beta1, beta2 = (float(b) for b in params.pop("betas"))
            c.merge("optimizer.params.betas[0]", "adam_beta1", beta1)
            c.merge("optimizer.params.betas[1]", "adam_beta2", beta2)
    elif kind == "sgd":
        c.merge("optimizer.type", "optimizer", "sgd", block["type"])
        names = _SGD_PARAMS
    else:
        raise c.error(
            f"optimizer.type={_show(block.get('type'))}: only Adam, AdamW and SGD are built; "
            "use one of them (or --optimizer) and remove the block"
        )
    for key, value in params.items():
        if key not in names:
            raise c.error(
                f"optimizer.params.{key} is not a parameter of this project's {kind} "
                f"({', '.join(sorted(names))}{', betas' if names is _ADAM_PARAMS else ''}); remove it"
            )
        c.merge(f"optimizer.params.{key}", names[key], float(value))


def _scheduler(c: _Config) -> None:
    """DeepSpeed's warm-up schedules as Megatron's (counted in optimizer steps)."""
    block = c.cfg.get("scheduler")
    if not block:
        return
    a, kind = c.args, block.get("type")
    p = dict(block.get("params") or {})
    if kind not in _SCHEDULERS:
        raise c.error(
            f"scheduler.type={_show(kind)}: only {', '.join(_SCHEDULERS)} map onto Megatron's "
            "schedule; remove the block and use --lr-decay-style with --lr-warmup-*/--lr-decay-*"
        )
    if a.train_iters is None:
        raise c.error(
            f"scheduler {kind} counts optimizer steps: give --train-iters, or remove the block "
            "and use --lr-warmup-samples/--lr-decay-samples (or -tokens)"
        )
    if p.get("warmup_type", "log") != "linear":
        raise c.error(
            f"scheduler.params.warmup_type={_show(p.get('warmup_type', 'log'))}: only linear "
            'warm-up is built; set "warmup_type": "linear"'
        )
    start = (
        p.get("warmup_min_ratio", 0.0) if kind == "WarmupCosineLR" else p.get("warmup_min_lr", 0.0)
    )
    if start != 0:
        raise c.error(f"scheduler {kind}: the warm-up starts at 0 here, not {start}; set it to 0")
    c.merge(
        "scheduler.params.warmup_num_steps", "lr_warmup_iters", int(p.get("warmup_num_steps", 1000))
    )
    if kind != "WarmupCosineLR" and "warmup_max_lr" in p:
        c.merge("scheduler.params.warmup_max_lr", "lr", float(p["warmup_max_lr"]))
    style = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}[kind]
    c.merge("scheduler.type", "lr_decay_style", style, f"{kind} (--lr-decay-style {style})")
    if kind == "WarmupLR":
        return
    if "total_num_steps" not in p:
        raise c.error(f"scheduler {kind} needs params.total_num_steps")
    c.merge("scheduler.params.total_num_steps", "lr_decay_iters", int(p["total_num_steps"]))
    if kind == "WarmupCosineLR":
        if a.lr is None:
            raise c.error("scheduler WarmupCosineLR scales the learning rate: give --lr")
        ratio = float(p.get("cos_min_ratio", 0.0001))
        c.merge(
            "scheduler.params.cos_min_ratio", "min_lr", ratio * a.lr, f"{ratio} (x --lr {a.lr})"
        )
    else:
        c.merge("scheduler.params.warmup_min_lr", "min_lr", 0.0)


def _other_honoured(c: _Config) -> None:
    cfg, a = c.cfg, c.args
    zero = cfg.get("zero_optimization") or {}
    if "stage" in zero:
        c.merge("zero_optimization.stage", "zero_stage", int(zero["stage"]))
    _offload_fields(c)
    if "gradient_clipping" in cfg:
        c.merge("gradient_clipping", "clip_grad", float(cfg["gradient_clipping"]))
    if "steps_per_print" in cfg and int(cfg["steps_per_print"]) != a.log_interval:
        c.note(
            "steps_per_print",
            cfg["steps_per_print"],
            f"the iteration line follows --log-interval {a.log_interval}",
        )
    if (cfg.get("activation_checkpointing") or {}).get("cpu_checkpointing") is True:
        a.checkpoint_in_cpu = True
    tb = cfg.get("tensorboard") or {}
    if tb.get("enabled") is True:
        path = os.path.join(tb.get("output_path") or ".", tb.get("job_name", "DeepSpeedJobName"))
        c.merge("tensorboard.output_path/job_name", "tensorboard_dir", path)


def _list_and_refuse(c: _Config) -> None:
    for name, value in c.cfg.items():
        default = TOP_LEVEL[name]
        if name in REFUSED and _active(value, default):
            raise c.error(f"{name}: {REFUSED[name]}; remove the field")
        if name in NO_EFFECT and _active(value, default):
            c.note(name, value, NO_EFFECT[name])
        if name in SECTION_NO_EFFECT and isinstance(value, dict) and _active(value):
            for field, why in SECTION_NO_EFFECT[name].items():
                if field in value and _active(value[field], SECTIONS[name][field]):
                    c.note(f"{name}.{field}", value[field], why)


def apply_deepspeed_config(
    args: argparse.Namespace, defaults: Callable[[str], object]
) -> list[str]:
    """Read ``args.deepspeed_config`` into ``args``; return the one warning line (or none).

    ``defaults(dest)`` is the parser's default of a flag, used to tell whether a flag was
    given when the arguments carry no ``flags_given`` record.
    """
    args.loss_scale_consecutive_hysteresis = False
    if args.deepspeed_config is None:
        return []
    try:
        with open(args.deepspeed_config, encoding="utf-8") as f:
            cfg = json.load(f)
    except OSError as e:
        raise UsageError(
            f"--deepspeed_config {args.deepspeed_config}: cannot read ({e.strerror})"
        ) from None
    except json.JSONDecodeError as e:
        raise UsageError(
            f"--deepspeed_config {args.deepspeed_config}: not valid JSON ({e})"
        ) from None
    c = _Config(args, cfg, defaults)
    _check_names(c)
    _list_and_refuse(c)
    _batch(c)
    _precision(c)
    _optimizer(c)
    _scheduler(c)
    _other_honoured(c)
    if not c.notes:
        return c.lines
    return c.lines + [
        f"--deepspeed_config {c.path}: {len(c.notes)} field(s) change nothing here: "
        + "; ".join(c.notes)
    ]
