"""Start-up validation of the parsed arguments: every inconsistency is one clear line.

``validate_args`` fills in derived values (data-parallel size, head size, dtype, ...) and
raises :class:`~megatron.errors.UsageError` naming the flags and numbers involved.
"""

from __future__ import annotations

import argparse
import logging

import torch

from megatron.core.parallel_state import ParallelDims
from megatron.core.sequence.layer import check_heads_for_sp
from megatron.data.batch import padded_seq_length, sequence_shard_unit
from megatron.errors import UsageError
from megatron.initialize.arguments import COMPAT_ONLY, build_parser
from megatron.initialize.deepspeed_config import apply_deepspeed_config
from megatron.initialize.long_context_args import check_long_context_args
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
    sp, cp = args.ds_sequence_parallel_size, args.context_parallel_size
    check_heads_for_sp(args.num_attention_heads, args.num_key_value_heads, sp)
    padded = padded_seq_length(args.seq_length, sequence_shard_unit(sp, cp))
    if padded != args.seq_length:
        logger.info(
            "> --seq-length %d is padded to %d (%d padding tokens per sample, out of the loss) "
            "so it splits over --ds-sequence-parallel-size %d%s",
            args.seq_length,
            padded,
            padded - args.seq_length,
            sp,
            f" x 2 x --context-parallel-size {cp}" if cp > 1 else "",
        )
    _check_context_parallel(args)


def _check_context_parallel(args: argparse.Namespace) -> None:
    cp = args.context_parallel_size
    if cp == 1:
        return
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
    if args.checkpoint_activations:
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
    if args.cross_entropy_loss_fusion and args.loss_chunk_size == 0:
        raise UsageError(
            "--cross-entropy-loss-fusion fuses the chunked loss: set --loss-chunk-size > 0 "
            "(default 2048) or drop the flag"
        )


_FPDT_POINTER = (
    "for long sequences use --checkpoint-activations --checkpoint-in-cpu (each recomputed "
    "layer's input in host memory), --loss-chunk-size, and size the run with "
    "tools/estimate_memory.py"
)


def _check_fpdt(args: argparse.Namespace) -> None:
    """Megatron-DeepSpeed's FPDT is not built: each of its flags is refused with a pointer."""
    for flag, value in (
        ("--ds-sequence-parallel-fpdt", args.ds_sequence_parallel_fpdt),
        ("--ds-sequence-parallel-fpdt-chunk-size", args.ds_sequence_parallel_fpdt_chunk_size),
        ("--ds-sequence-parallel-fpdt-offloading", args.ds_sequence_parallel_fpdt_offloading),
    ):
        if value not in (None, False):
            shown = "" if value is True else f" {value}"
            raise UsageError(
                f"{flag}{shown}: FPDT (chunked, offloaded Ulysses attention) is not built here; "
                f"drop the flag; {_FPDT_POINTER}"
            )


def _check_evaluation(args: argparse.Namespace) -> None:
    if args.skip_train and not args.eval_iters:
        raise UsageError(
            "--skip-train skips training and runs only the evaluation, but --eval-iters is 0; "
            "set --eval-iters N"
        )
    if args.tensorboard_log_interval is None:
        args.tensorboard_log_interval = args.log_interval
    elif args.tensorboard_log_interval < 1:
        raise UsageError(f"--tensorboard-log-interval {args.tensorboard_log_interval} must be >= 1")


def _apply_deepspeed_config(args: argparse.Namespace) -> list[str]:
    """Every field of --deepspeed_config honoured, refused or listed (``deepspeed_config``)."""
    parser = build_parser()
    lines = apply_deepspeed_config(args, parser.get_default)
    args.zero_stage = 0 if args.zero_stage is None else args.zero_stage
    return lines


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
    _check_fpdt(args)
    _check_model_shape(args)
    _check_sequence_parallel(args)
    deepspeed_lines = _apply_deepspeed_config(args)
    offload_notes = check_long_context_args(args)
    _check_batch(args)
    _check_precision(args)
    _check_training(args)
    _check_evaluation(args)
    args.compat_warnings = compat_warnings(args) + deepspeed_lines + offload_notes
    return args
