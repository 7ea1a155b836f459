#!/usr/bin/env python
"""Predict per-GPU training memory for a Megatron command line (see megatron/planning/memory_model.py).

Takes the same model/parallelism flags as ``pretrain_gpt.py`` plus ``--num-gpus`` and
``--gpu-memory-gb``, prints the peak broken down by component, and with ``--find-sp`` the
smallest split of the sequence that fits: a Ulysses degree U (at most ``--gpus-per-node``)
times a ring degree R (``--context-parallel-size``), Ulysses preferred at equal U x R; with
``--find-max-seq`` the longest sequence on ``--num-gpus`` GPUs with ``--host-memory-gb`` of
host memory per node, and the flags that reach it (full recompute, ``--tiled-mlp-chunk-size``,
``--checkpoint-in-cpu``, ``--cpu-optimizer``, ``--cpu-offload-params``: each rung of
:mod:`megatron.planning.long_context` adds one). Numbers are what
``torch.cuda.max_memory_allocated`` would report; ``--reserve-gb`` is kept free for the
CUDA context, NCCL and fragmentation. The host memory line counts the offloaded states
and activations of one GPU's process.

Example: the longest sequence of a Llama-3-8B-shaped model on one 80 GB GPU, 256 GB host::

    python tools/estimate_memory.py --num-layers 32 --hidden-size 4096 \
        --num-attention-heads 32 --group-query-attention --num-query-groups 8 \
        --ffn-hidden-size 14336 --swiglu --normalization RMSNorm \
        --position-embedding-type rope --disable-bias-linear --seq-length 8192 \
        --padded-vocab-size 128256 --micro-batch-size 1 --bf16 --use-flash-attn \
        --num-gpus 1 --host-memory-gb 256 --find-max-seq

Example (GPT-3 1.3B, 32K tokens, 4 GPUs)::

    python tools/estimate_memory.py --num-layers 24 --hidden-size 2048 \\
        --num-attention-heads 16 --seq-length 32768 --padded-vocab-size 50304 \\
        --micro-batch-size 1 --bf16 --use-flash-attn --num-gpus 4 \\
        --ds-sequence-parallel-size 4 --zero-stage 1 --recompute-granularity full
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.errors import UsageError  # noqa: E402
from megatron.planning.long_context import PROCESS_HOST_BYTES, find_max_seq  # noqa: E402
from megatron.planning.long_context import setup_from_args as _setup_from_args  # noqa: E402
from megatron.planning.memory_model import (  # noqa: E402
    GIB,
    MemoryEstimate,
    RunSetup,
    estimate_memory,
    find_sequence_split,
)

LABELS = {
    "params": "parameters (fp32 master)",
    "params_unsharded": "parameters (ZeRO all-gathered)",
    "params_lowp": "parameters (autocast low-precision copies)",
    "grads": "gradients (fp32)",
    "optimizer": "optimizer (AdamW 2 x fp32)",
    "activations": "activations (saved for backward)",
    "attention_workspace": "attention workspace (local attention backward)",
    "all_to_all": "all-to-all buffers",
    "logits": "logits / loss transients",
    "working": "other backward temporaries",
}


def _extra_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("memory estimate")
    g.add_argument("--num-gpus", type=int, default=1, help="GPUs of the run (SP x DP)")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU, GiB")
    g.add_argument(
        "--reserve-gb",
        type=float,
        default=3.0,
        help="GiB kept free for the CUDA context, NCCL buffers and allocator fragmentation",
    )
    g.add_argument("--padded-vocab-size", type=int, default=None, help="vocabulary after padding")
    g.add_argument(
        "--find-sp",
        action="store_true",
        help="report the smallest Ulysses x ring split of the sequence that fits",
    )
    g.add_argument(
        "--find-max-seq",
        action="store_true",
        help="report the longest sequence that fits (all GPUs one SP group) and its flags",
    )
    g.add_argument("--host-memory-gb", type=float, default=512.0, help="host memory per node, GiB")
    g.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node (default: --num-gpus, at most 8); --find-sp's largest Ulysses "
        "degree (its all-to-alls stay inside a node)",
    )
    g.add_argument("--json", type=str, default=None, help="also write the estimate(s) here")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Megatron's parser and checks, with the world size taken from ``--num-gpus``."""
    from megatron.initialize.argument_checks import validate_args
    from megatron.initialize.arguments import parse_args
    from megatron.tokenizer.tokenizer import vocab_size_with_padding

    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept "--recompute-granularity none" (Megatron's parser knows full/selective only).
    for i in range(len(argv) - 1):
        if argv[i] == "--recompute-granularity" and argv[i + 1] == "none":
            del argv[i : i + 2]
            break
    args = parse_args(_extra_args, args_list=argv)
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus {args.num_gpus} must be >= 1")
    if args.gpu_memory_gb <= 0:
        raise UsageError(f"--gpu-memory-gb {args.gpu_memory_gb} must be positive")
    args.world_size, args.rank = args.num_gpus, 0
    if args.micro_batch_size is None:
        args.micro_batch_size = 1
    if args.find_sp or args.find_max_seq:
        args.ds_sequence_parallel_size = 1  # checked per candidate below
        args.context_parallel_size = 1
    if args.gpus_per_node is None:
        args.gpus_per_node = min(args.num_gpus, 8)
    if args.padded_vocab_size is None:
        if args.vocab_size is None:
            raise UsageError(
                "the vocabulary size is unknown: pass --padded-vocab-size N (or --vocab-size N, "
                "padded to --make-vocab-size-divisible-by)"
            )
        args.padded_vocab_size = vocab_size_with_padding(
            args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
    validate_args(args)
    return args


def setup_from_args(
    args: argparse.Namespace, sp: int | None = None, cp: int | None = None
) -> RunSetup:
    return _setup_from_args(args, sp, cp)


def format_estimate(est: MemoryEstimate, setup: RunSetup, budget: int) -> str:
    """The breakdown as a markdown table plus a one-line verdict."""
    lines = [
        f"SP {setup.sp} x {f'CP {setup.cp} x ' if setup.cp > 1 else ''}"
        f"DP {setup.num_gpus // (setup.sp * setup.cp)}, ZeRO {setup.zero_stage}, "
        f"{setup.precision}, {est.tokens_per_gpu} tokens per GPU, "
        f"{est.details['params_per_gpu'] / 1e6:.1f}M of {est.details['num_params'] / 1e6:.1f}M "
        "parameters per GPU",
        "",
        "| component | GiB |",
        "|---|---:|",
    ]
    for name in MemoryEstimate.COMPONENTS:
        lines.append(f"| {LABELS[name]} | {getattr(est, name) / GIB:.2f} |")
    lines.append(f"| **total (peak: {est.peak_phase})** | **{est.total / GIB:.2f}** |")
    layer = est.details["layer_backward"]
    lines += [
        "",
        f"per layer: {est.activations_per_layer / GIB:.3f} GiB saved without recompute; "
        f"attention workspace {layer['attention_workspace'] / GIB:.3f} GiB, all-to-all "
        f"buffers {layer['all_to_all'] / GIB:.3f} GiB",
        f"{'fits' if est.total <= budget else 'does NOT fit'} in {budget / GIB:.1f} GiB "
        "(GPU memory minus --reserve-gb)",
        f"host memory per GPU process: {est.host / GIB:.2f} GiB offloaded (states and "
        f"activations) + about {PROCESS_HOST_BYTES / GIB:.0f} GiB of the process's own",
    ]
    return "\n".join(lines)


def _report_max_seq(args: argparse.Namespace, config, budget: int) -> int:
    host = int(args.host_memory_gb * GIB)
    best, tried = find_max_seq(config, setup_from_args(args, 1), budget, host, args.gpus_per_node)
    print(
        f"{args.num_gpus} GPU(s) of {args.gpu_memory_gb:g} GiB ({budget / GIB:.1f} usable), "
        f"{args.host_memory_gb:g} GiB host memory per node of {args.gpus_per_node} GPU(s)\n"
    )
    print("| settings | longest sequence | SP | peak GPU GiB | host GiB per node |")
    print("|---|---:|---:|---:|---:|")
    for plan in tried:
        gpu = f"{plan.estimate.total / GIB:.1f}" if plan.estimate else "-"
        per_node = (
            (plan.estimate.host + PROCESS_HOST_BYTES) * args.gpus_per_node if plan.estimate else 0
        )
        host_gib = f"{per_node / GIB:.1f}" if plan.estimate else "-"
        print(f"| {plan.rung} | {plan.seq_length} | {plan.sp} | {gpu} | {host_gib} |")
    print()
    if best is None:
        print("no sequence of one 1024-token tile per GPU fits: more GPUs or memory needed")
        return 1
    flags = " ".join(best.flags) or "(none beyond the given ones)"
    print(
        f"longest sequence: {best.seq_length} tokens ({best.rung}); flags: "
        f"--seq-length {best.seq_length} --ds-sequence-parallel-size {best.sp} {flags}"
    )
    if args.json:
        payload = {
            "best": {**vars(best), "estimate": best.estimate.as_dict()},
            "tried": [{**vars(p), "estimate": p.estimate and p.estimate.as_dict()} for p in tried],
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        from megatron.model import ModelConfig

        config = ModelConfig.from_args(args)
        budget = int((args.gpu_memory_gb - args.reserve_gb) * GIB)
        if args.find_max_seq:
            return _report_max_seq(args, config, budget)
        if args.find_sp:
            best, tried = find_sequence_split(
                config, setup_from_args(args, 1, 1), budget, args.gpus_per_node
            )
            print("| Ulysses U | ring R | peak GiB | fits |\n|---:|---:|---:|---|")
            for (sp, cp), est in tried:
                fits = "yes" if est.total <= budget else "no"
                print(f"| {sp} | {cp} | {est.total / GIB:.2f} | {fits} |")
            print()
            if best is None:
                print(
                    f"no Ulysses x ring split on {args.num_gpus} GPUs fits in {budget / GIB:.1f} GiB"
                )
            else:
                print(
                    f"smallest split that fits: Ulysses {best[0]} x ring {best[1]} "
                    "(--ds-sequence-parallel-size, --context-parallel-size)"
                )
            chosen = tried[-1]  # the fitting split, or the largest one tried
            estimates = dict(tried)
        else:
            setup = setup_from_args(args)
            chosen = ((setup.sp, setup.cp), estimate_memory(config, setup))
            estimates = dict([chosen])
        (sp, cp), est = chosen
        print(format_estimate(est, setup_from_args(args, sp, cp), budget))
        if args.json:

            def key(split: tuple[int, int]) -> str:  # "U" alone without a ring, else "UxR"
                return str(split[0]) if split[1] == 1 else f"{split[0]}x{split[1]}"

            payload = {key(k): v.as_dict() for k, v in estimates.items()}
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"budget_bytes": budget, "estimates_by_sp": payload}, f, indent=2)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
