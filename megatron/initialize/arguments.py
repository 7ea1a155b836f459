"""Megatron-compatible command line, organised by group.

Flag names and defaults follow Megatron-LM / Megatron-DeepSpeed so existing launch scripts
run unchanged. Flags accepted only for compatibility are listed in ``COMPAT_ONLY`` and get
one warning at start-up; consistency checks live in :mod:`megatron.initialize.argument_checks`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from megatron.initialize.long_context_args import add_long_context_args

# Flags accepted so existing scripts run, with what they mean here. Each one that is set
# earns one start-up warning (see argument_checks.warn_compat_flags).
COMPAT_ONLY = {
    "no_async_tensor_model_parallel_allreduce": "tensor parallelism is not built, so there is no all-reduce to overlap",
    "data_impl": "only the mmap format exists; the format is read from the .idx header",
    "deepspeed": "this framework does not use the DeepSpeed engine; --zero-stage and --deepspeed_config are honoured natively",
    "no_pipeline_parallel": "pipeline parallelism is not built; every run is a single stage",
    "deepspeed_activation_checkpointing": "it picks DeepSpeed's checkpoint function in Megatron-DeepSpeed; recomputation here is this project's own, on with --checkpoint-activations (or --recompute-granularity full)",
    "timing_log_level": "only the iteration time is measured (the iteration line and --log-timers-to-tensorboard); levels 1 and 2 add no timers",
    "distribute_checkpointed_activations": "checkpointed activations are not partitioned (no tensor parallelism)",
    "accumulate_allreduce_grads_in_fp32": "gradients are always reduced and accumulated in fp32",
    "no_masked_softmax_fusion": "no fused masked-softmax kernel is used",
    "use_distributed_optimizer": "optimizer state sharding is --zero-stage 1/2/3 through FSDP2",
    "fp16_lm_cross_entropy": "the cross entropy is always computed in fp32",
    "log_optimizer_states_to_tensorboard": "optimizer-state norms are not logged yet",
}


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument(
        "--ffn-hidden-size",
        type=int,
        default=None,
        help="default 4 x hidden (or 8/3 x hidden rounded, with --swiglu)",
    )
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument(
        "--kv-channels", type=int, default=None, help="head size; default hidden / heads"
    )
    g.add_argument(
        "--num-key-value-heads", type=int, default=None, help="GQA/MQA: number of key/value heads"
    )
    g.add_argument(
        "--group-query-attention",
        action="store_true",
        help="Megatron-LM spelling: GQA with --num-query-groups",
    )
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument(
        "--position-embedding-type",
        type=str,
        default=None,
        choices=["learned_absolute", "rope", "none"],
    )
    g.add_argument("--use-rotary-position-embeddings", action="store_true")
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument(
        "--rotary-position-embeddings-theta",
        "--rotary-base",
        dest="rotary_position_embeddings_theta",
        type=float,
        default=10000.0,
    )
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument(
        "--normalization", type=str, default="LayerNorm", help="LayerNorm or RMSNorm (any case)"
    )
    g.add_argument(
        "--layernorm-epsilon", "--norm-epsilon", dest="layernorm_epsilon", type=float, default=1e-5
    )
    g.add_argument("--swiglu", action="store_true")
    g.add_argument(
        "--fp32-residual-connection",
        action="store_true",
        help="keep the residual stream in fp32 under --bf16/--fp16 (default: the compute "
        "dtype, as Megatron-LM; the norms compute in fp32 either way)",
    )
    g.add_argument(
        "--openai-gelu", action="store_true", help="tanh-approximated GeLU, as GPT-2 uses"
    )
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--no-masked-softmax-fusion", action="store_true")
    g.add_argument(
        "--no-bias-gelu-fusion",
        action="store_true",
        help="GeLU MLP with biases: add the first linear's bias in the linear, not inside the "
        "fused GeLU kernel (which runs on CUDA by default, its backward summing the bias "
        "gradient in the same pass)",
    )
    g.add_argument(
        "--no-bias-dropout-fusion",
        action="store_true",
        help="with --fused-residual-norm and no hidden dropout: add the attention output "
        "projection's and the MLP's second bias in their linears, not inside the fused "
        "residual add + norm (whose backward sums their gradients by default)",
    )


def _add_regularization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument(
        "--weight-decay-incr-style",
        type=str,
        default="constant",
        choices=["constant", "linear", "cosine"],
    )
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument(
        "--rampup-batch-size", nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES")
    )
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="alias of --recompute-granularity full",
    )
    g.add_argument("--recompute-granularity", type=str, default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", type=str, default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument(
        "--checkpoint-in-cpu",
        action="store_true",
        help="with full recompute, keep each recomputed group's input in host memory (longest sequences)",
    )
    g.add_argument("--distribute-checkpointed-activations", action="store_true")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=int, default=None)
    g.add_argument("--exit-signal-handler", action="store_true")
    g.add_argument(
        "--max-nan-iterations",
        type=int,
        default=3,
        help="stop after this many non-finite iterations in a row (bf16/fp32)",
    )
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam", "adamw", "sgd"])
    g.add_argument("--dataloader-type", type=str, default="single", choices=["single", "cyclic"])
    g.add_argument("--no-async-tensor-model-parallel-allreduce", action="store_true")
    g.add_argument(
        "--no-gradient-accumulation-fusion",
        action="store_true",
        help="ZeRO 1 over several micro-batches: the low-precision weight gradients of "
        "--delay-wgrad-compute's GEMMs are cast and summed in fp32 by FSDP2 per micro-batch, "
        "instead of written and accumulated in fp32 by the GEMMs themselves",
    )
    g.add_argument(
        "--no-embedding-grads-in-place",
        action="store_true",
        help="the embedding's and the output layer's weight gradients go through autograd, "
        "instead of being added into .grad in place",
    )
    g.add_argument(
        "--use-flash-attn",
        "--use-flash-attn-v2",
        dest="use_flash_attn",
        action="store_true",
        help="flash_attn v2 if importable, else the kernel measured fastest for the mask on "
        "this GPU (megatron/ops/attention_choice.py): PyTorch SDPA for causal attention, our "
        "Triton kernel for packed documents (O(s) memory)",
    )
    g.add_argument(
        "--use-flash-attn-triton",
        action="store_true",
        help="this project's Triton FlashAttention kernels",
    )
    g.add_argument(
        "--sdpa-block-size",
        type=int,
        default=65536,
        help="with --use-flash-attn (torch SDPA, not flash_attn): causal attention over a "
        "sequence of at least twice this many tokens per GPU runs as square blocks of it, "
        "which keeps cuDNN's forward at its shorter-sequence speed (0: one call)",
    )
    g.add_argument(
        "--loss-chunk-size",
        type=int,
        default=2048,
        help="tokens per chunk of the output layer + cross entropy (0: unchunked)",
    )
    g.add_argument(
        "--no-loss-grad-in-forward",
        action="store_true",
        help="the chunked loss recomputes each chunk's logits in backward instead of computing "
        "its gradients in forward (an extra output-layer GEMM; for comparison)",
    )
    g.add_argument(
        "--fused-residual-norm",
        action="store_true",
        help="each residual add and the norm after it (post-attention, next layer's input, "
        "final) in one Triton pass each way (CUDA; CPU runs it only under TRITON_INTERPRET=1, "
        "else unfused)",
    )
    g.add_argument(
        "--delay-wgrad-compute",
        action="store_true",
        help="with sequence parallelism: each layer's MLP and attention output projection "
        "compute their weight gradients while the backward all-to-alls are in flight",
    )
    g.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="the chunked loss's softmax, loss and logit gradient in one Triton pass per chunk "
        "(CUDA; CPU runs it only under TRITON_INTERPRET=1, else the unfused path)",
    )
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument(
        "--device",
        type=str,
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: cuda when available",
    )


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument(
        "--lr-decay-style",
        type=str,
        default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
    )
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument(
        "--override-opt_param-scheduler",
        "--override-lr-scheduler",
        dest="override_opt_param_scheduler",
        action="store_true",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        "--use-checkpoint-lr-scheduler",
        dest="use_checkpoint_opt_param_scheduler",
        action="store_true",
    )


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--load", type=str, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--use-checkpoint-args", action="store_true")
    g.add_argument(
        "--keep-last-n-checkpoints",
        type=int,
        default=None,
        help="delete older checkpoints once a newer one is complete",
    )


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument(
        "--loss-scale", type=float, default=None, help="static loss scale; dynamic when unset"
    )
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--fp16-lm-cross-entropy", action="store_true")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true")
    g.add_argument(
        "--fp32-param-gather",
        action="store_true",
        help="ZeRO>=1 under --bf16/--fp16 gathers the transformer layers' weights in the "
        "compute dtype by default; this flag gathers fp32 weights and lets autocast cast them "
        "per use, as before",
    )


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument(
        "--ds-sequence-parallel-size", type=int, default=1, help="Ulysses sequence-parallel degree"
    )
    g.add_argument(
        "--no-sp-rank-major-qkv",
        action="store_true",
        help="Ulysses: project Q/K/V in Megatron's layout and pack them for the all-to-all, "
        "instead of projecting each rank's heads straight into the send buffer (the default "
        "with learned or no position embeddings)",
    )
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="Megatron-LM's tensor-parallel variant: refused here",
    )
    g.add_argument(
        "--context-parallel-size",
        type=int,
        default=1,
        help="ring attention (context parallelism) degree: the sequence is sharded over "
        "ring x Ulysses ranks, K/V blocks passed around the ring (groups of ranks strided by "
        "--ds-sequence-parallel-size, so they may span nodes)",
    )
    g.add_argument("--no-pipeline-parallel", action="store_true")
    g.add_argument("--distributed-backend", type=str, default=None, choices=["nccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None)
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3])
    g.add_argument(
        "--no-overlap-param-gather",
        action="store_true",
        help="ZeRO: all-gather each transformer layer's weights when its forward starts, "
        "instead of during the previous layer's (FSDP2 forward prefetch, the default); "
        "implies --no-overlap-param-gather-with-optimizer-step",
    )
    g.add_argument(
        "--no-overlap-param-gather-with-optimizer-step",
        action="store_true",
        help="ZeRO: all-gather the embeddings' and first layer's weights when the next forward "
        "starts, instead of during the optimizer step (which updates them first, the default)",
    )
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--deepspeed", action="store_true")
    g.add_argument(
        "--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", type=str, default=None
    )


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation")
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument(
        "--skip-train",
        action="store_true",
        help="load the checkpoint, skip training, run the validation and test evaluation",
    )


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="prefix, or weight prefix weight prefix ... to blend",
    )
    g.add_argument("--split", type=str, default="969, 30, 1")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", type=str, default=None)
    g.add_argument(
        "--mock-data", action="store_true", help="synthetic tokens: run without a dataset"
    )
    g.add_argument(
        "--data-impl", type=str, default=None, choices=["mmap", "infer", "lazy", "cached"]
    )
    g.add_argument("--vocab-file", type=str, default=None)
    g.add_argument("--merge-file", type=str, default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument(
        "--tokenizer-type",
        type=str,
        default=None,
        choices=[
            "GPT2BPETokenizer",
            "SentencePieceTokenizer",
            "GPTSentencePieceTokenizer",
            "HFTokenizer",
            "NullTokenizer",
        ],
    )
    g.add_argument("--tokenizer-model", type=str, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument(
        "--tensorboard-log-interval",
        type=int,
        default=None,
        help="write the training scalars to TensorBoard every N iterations (default: every "
        "--log-interval, with the iteration line)",
    )
    g.add_argument("--tensorboard-queue-size", type=int, default=1000)
    g.add_argument("--log-timers-to-tensorboard", action="store_true")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true")
    g.add_argument(
        "--no-log-learnig-rate-to-tensorboard",
        "--no-log-learning-rate-to-tensorboard",
        dest="log_learning_rate_to_tensorboard",
        action="store_false",
    )
    g.add_argument(
        "--no-log-loss-scale-to-tensorboard",
        dest="log_loss_scale_to_tensorboard",
        action="store_false",
    )
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true")
    g.add_argument("--log-optimizer-states-to-tensorboard", action="store_true")
    g.add_argument("--log-memory-to-tensorboard", action="store_true")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true")
    g.add_argument("--timing-log-level", type=int, default=0, choices=[0, 1, 2])
    g.add_argument("--wandb-project", type=str, default=None)
    g.add_argument("--wandb-exp-name", type=str, default=None)
    g.add_argument("--wandb-save-dir", type=str, default=None)


def _add_fpdt_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-DeepSpeed's FPDT flags: parsed so that the refusal can point to the
    long-context features built here (argument_checks._check_fpdt)."""
    g = parser.add_argument_group("FPDT (refused)")
    g.add_argument("--ds-sequence-parallel-fpdt", action="store_true")
    g.add_argument("--ds-sequence-parallel-fpdt-chunk-size", type=int, default=None)
    g.add_argument("--ds-sequence-parallel-fpdt-offloading", action="store_true")


def build_parser(extra_args_provider: Callable | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="megatron-ulysses arguments", allow_abbrev=False)
    for add in (
        _add_network_size_args,
        _add_regularization_args,
        _add_training_args,
        _add_learning_rate_args,
        _add_checkpointing_args,
        _add_mixed_precision_args,
        _add_distributed_args,
        add_long_context_args,
        _add_validation_args,
        _add_data_args,
        _add_logging_args,
        _add_fpdt_args,
    ):
        add(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def given_flags(parser: argparse.ArgumentParser, args_list: Sequence[str] | None) -> frozenset:
    """The dests the command line set, even to their default value (so that a
    --deepspeed_config field can tell a given flag from an untouched default)."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)
    for action, _ in saved:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    try:
        given, _ = parser.parse_known_args(args_list)
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)
    return frozenset(vars(given))


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun, the deepspeed launcher or SLURM's srun."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def parse_args(
    extra_args_provider: Callable | None = None,
    ignore_unknown_args: bool = False,
    args_list: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Parse the command line (or ``args_list``); rank and world size come from the launcher."""
    parser = build_parser(extra_args_provider)
    if ignore_unknown_args:
        args, _ = parser.parse_known_args(args_list)
    else:
        args = parser.parse_args(args_list)
    args.flags_given = given_flags(parser, args_list)
    args.rank, args.world_size, env_local_rank = launch_env()
    import torch.distributed as dist

    if dist.is_initialized():  # e.g. launched by a test harness or an embedding program
        args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
    if args.local_rank is None:
        args.local_rank = env_local_rank
    return args
