"""Start-up validation of the parsed arguments: every inconsistency is one clear line.

``validate_args`` fills in derived values (data-parallel size, head size, dtype, ...) and
raises :class:`~megatron.errors.UsageError` naming the flags and numbers involved.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from megatron.core.parallel_state import ParallelDims
from megatron.core.sequence.layer import check_heads_for_sp
from megatron.errors import UsageError
from megatron.initialize.arguments import COMPAT_ONLY
from megatron.model.config import derive_shape

logger = logging.getLogger(__name__)

REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_parallel_layout(args: argparse.Namespace) -> None:
    if args.sequence_parallel:
        raise UsageError(
            "--sequence-parallel is Megatron-LM's tensor-parallel sequence parallelism, which is not "
            "built here; for Ulysses sequence parallelism use --ds-sequence-parallel-size N"
        )
    if args.tensor_model_parallel_size > 1:
        raise UsageError(
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size}: tensor parallelism is not "
            "built yet; use 1 and scale with --ds-sequence-parallel-size and data parallelism"
        )
    if args.pipeline_model_parallel_size > 1:
        raise UsageError(
            f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: pipeline parallelism "
            "is not built yet; use 1"
        )
    dims = ParallelDims(
        args.world_size,
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        sp=args.ds_sequence_parallel_size,
        cp=args.context_parallel_size,
    )
    args.data_parallel_size = dims.dp


def _check_model_shape(args: argparse.Namespace) -> None:
    for name in REQUIRED:
        if getattr(args, name) is None:
            raise UsageError(f"{_flag(name)} is required")
    if args.group_query_attention:
        if args.num_query_groups is None:
            raise UsageError("--group-query-attention needs --num-query-groups N")
        if args.num_key_value_heads not in (None, args.num_query_groups):
            raise UsageError(
                f"--num-key-value-heads {args.num_key_value_heads} and --num-query-groups "
                f"{args.num_query_groups} disagree; pass one of them"
            )
        args.num_key_value_heads = args.num_query_groups
    args.num_key_value_heads, args.kv_channels, args.ffn_hidden_size = derive_shape(
        args.hidden_size,
        args.num_attention_heads,
        args.num_key_value_heads,
        args.kv_channels,
        args.ffn_hidden_size,
        args.swiglu,
    )
    norm = args.normalization.lower()
    if norm not in ("layernorm", "rmsnorm"):
        raise UsageError(f"--normalization {args.normalization}: expected LayerNorm or RMSNorm")
    args.normalization = "RMSNorm" if norm == "rmsnorm" else "LayerNorm"
    if args.position_embedding_type is None:
        args.position_embedding_type = (
            "rope" if args.use_rotary_position_embeddings else "learned_absolute"
        )
    elif args.use_rotary_position_embeddings and args.position_embedding_type != "rope":
        raise UsageError(
            f"--use-rotary-position-embeddings contradicts --position-embedding-type {args.position_embedding_type}"
        )
    args.use_rotary_position_embeddings = args.position_embedding_type == "rope"
    if not 0.0 < args.rotary_percent <= 1.0:
        raise UsageError(f"--rotary-percent {args.rotary_percent} must be in (0, 1]")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if (
        args.position_embedding_type == "learned_absolute"
        and args.max_position_embeddings < args.seq_length
    ):
        raise UsageError(
            f"--max-position-embeddings {args.max_position_embeddings} is smaller than --seq-length "
            f"{args.seq_length}; learned positions need one embedding per position"
        )


def _check_sequence_parallel(args: argparse.Namespace) -> None:
    sp = args.ds_sequence_parallel_size
    if args.sp_overlap_chunks < 1:
        raise UsageError(f"--sp-overlap-chunks {args.sp_overlap_chunks} must be >= 1")
    check_heads_for_sp(args.num_attention_heads, args.num_key_value_heads, sp)
    if args.seq_length % sp != 0:
        raise UsageError(
            f"--seq-length {args.seq_length} is not divisible by --ds-sequence-parallel-size {sp}; "
            "every sequence-parallel rank holds an equal slice"
        )
    _check_context_parallel(args)


def _check_context_parallel(args: argparse.Namespace) -> None:
    cp, sp = args.context_parallel_size, args.ds_sequence_parallel_size
    if cp == 1:
        return
    if args.seq_length % (2 * cp) or args.seq_length % (cp * sp):
        raise UsageError(
            f"--seq-length {args.seq_length} must be divisible by 2 x --context-parallel-size "
            f"({2 * cp}) and by --context-parallel-size x --ds-sequence-parallel-size ({cp * sp}): "
            "each ring rank holds two equal chunks, split equally over its Ulysses ranks"
        )
    if args.sp_overlap_chunks > 1:
        raise UsageError(
            f"--sp-overlap-chunks {args.sp_overlap_chunks} and --context-parallel-size {cp}: the "
            "pipelined all-to-alls do not run ring attention; drop one"
        )
    if args.attention_dropout > 0:
        raise UsageError(
            f"--attention-dropout {args.attention_dropout} and --context-parallel-size {cp}: ring "
            "attention has no attention dropout; use --attention-dropout 0"
        )


def _check_batch(args: argparse.Namespace) -> None:
    if args.micro_batch_size is None:
        raise UsageError(
            "--micro-batch-size is required (or train_micro_batch_size_per_gpu in --deepspeed_config)"
        )
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.rampup_batch_size is None and args.global_batch_size % per_step != 0:
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size} = {per_step}"
        )


def _check_precision(args: argparse.Namespace) -> None:
    if args.fp16 and args.bf16:
        raise UsageError("--fp16 and --bf16 were both given; choose one")
    args.params_dtype = (
        torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    )
    if args.fp32_param_gather and (args.params_dtype == torch.float32 or args.zero_stage == 0):
        raise UsageError(
            "--fp32-param-gather changes only --zero-stage 1/2/3 runs with --bf16 or --fp16 "
            f"(here: --zero-stage {args.zero_stage}, {str(args.params_dtype).split('.')[-1]}); "
            "drop it"
        )


def _check_training(args: argparse.Namespace) -> None:
    if args.checkpoint_activations or args.deepspeed_activation_checkpointing:
        if args.recompute_granularity == "selective":
            raise UsageError(
                "--checkpoint-activations means full recomputation; drop --recompute-granularity selective"
            )
        args.recompute_granularity = "full"
    if args.recompute_granularity == "full":
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
    elif args.recompute_method is not None:
        raise UsageError("--recompute-method needs --recompute-granularity full")
    if args.checkpoint_in_cpu and args.recompute_granularity != "full":
        raise UsageError(
            "--checkpoint-in-cpu moves the inputs of fully recomputed layers to host memory; "
            "add --checkpoint-activations (or --recompute-granularity full)"
        )
    if args.train_iters is not None and args.train_samples is not None:
        raise UsageError("--train-iters and --train-samples were both given; choose one")
    if args.train_iters is not None and args.rampup_batch_size is not None:
        raise UsageError(
            "--rampup-batch-size needs --train-samples (as in Megatron), not --train-iters"
        )
    if args.loss_chunk_size < 0:
        raise UsageError(f"--loss-chunk-size {args.loss_chunk_size} must be >= 0")
    if args.sdpa_block_size < 0:
        raise UsageError(
            f"--sdpa-block-size {args.sdpa_block_size} must be >= 0 (0: one attention call)"
        )
    if args.fused_residual_norm and args.torch_compile:
        raise UsageError(
            "--fused-residual-norm and --torch-compile: the compiled layer fuses its norms "
            "itself; drop one"
        )
    if args.delay_wgrad_compute and (args.sp_overlap_chunks > 1 or args.torch_compile):
        flag = "--torch-compile" if args.torch_compile else "--sp-overlap-chunks > 1"
        raise UsageError(
            f"--delay-wgrad-compute and {flag}: the deferred weight gradients run during the "
            "plain, eager all-to-alls' backward; drop one"
        )
    if args.cross_entropy_loss_fusion and args.loss_chunk_size == 0:
        raise UsageError(
            "--cross-entropy-loss-fusion fuses the chunked loss: set --loss-chunk-size > 0 "
            "(default 2048) or drop the flag"
        )


def _apply_deepspeed_config(args: argparse.Namespace) -> None:
    """Honour the fields of a DeepSpeed JSON config that matter here; conflicts are errors."""
    if args.deepspeed_config is None:
        args.zero_stage = 0 if args.zero_stage is None else args.zero_stage
        return
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

    def merge(flag_name: str, attr: str, value, default=None) -> None:
        current = getattr(args, attr)
        if current is None or current == default:
            setattr(args, attr, value)
        elif current != value:
            raise UsageError(
                f"--deepspeed_config {args.deepspeed_config} sets {flag_name}={value} but "
                f"{_flag(attr)} is {current}; make them agree or drop one"
            )

    if "train_micro_batch_size_per_gpu" in cfg:
        merge(
            "train_micro_batch_size_per_gpu",
            "micro_batch_size",
            int(cfg["train_micro_batch_size_per_gpu"]),
        )
    if "train_batch_size" in cfg:
        merge("train_batch_size", "global_batch_size", int(cfg["train_batch_size"]))
    if "zero_optimization" in cfg:
        merge(
            "zero_optimization.stage", "zero_stage", int(cfg["zero_optimization"].get("stage", 0))
        )
    if "gradient_clipping" in cfg:
        merge("gradient_clipping", "clip_grad", float(cfg["gradient_clipping"]), default=1.0)
    for block in ("fp16", "bf16"):
        enabled = cfg.get(block, {}).get("enabled", False)
        if enabled in (True, "true", "auto"):
            other = "bf16" if block == "fp16" else "fp16"
            if getattr(args, other):
                raise UsageError(
                    f"--deepspeed_config {args.deepspeed_config} enables {block} but --{other} was given"
                )
            setattr(args, block, True)
    if cfg.get("fp16", {}).get("loss_scale", 0):
        merge("fp16.loss_scale", "loss_scale", float(cfg["fp16"]["loss_scale"]))
    if "gradient_accumulation_steps" in cfg and args.micro_batch_size and args.global_batch_size:
        gas = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
        if int(cfg["gradient_accumulation_steps"]) != gas:
            raise UsageError(
                f"--deepspeed_config {args.deepspeed_config} sets gradient_accumulation_steps="
                f"{cfg['gradient_accumulation_steps']} but the batch flags give {gas} "
                f"(global {args.global_batch_size} / (micro {args.micro_batch_size} x DP {args.data_parallel_size}))"
            )
    args.zero_stage = 0 if args.zero_stage is None else args.zero_stage


def compat_warnings(args: argparse.Namespace) -> list[str]:
    """One line for each compatibility-only flag that was set."""
    lines = []
    for name, why in COMPAT_ONLY.items():
        value = getattr(args, name, None)
        if value not in (None, False):
            lines.append(
                f"{_flag(name)} is accepted for compatibility and changes nothing here: {why}"
            )
    return lines


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check every combination once at start-up and derive the dependent values."""
    _check_parallel_layout(args)
    _check_model_shape(args)
    _check_sequence_parallel(args)
    _apply_deepspeed_config(args)
    _check_batch(args)
    _check_precision(args)
    _check_training(args)
    args.compat_warnings = compat_warnings(args)
    return args
