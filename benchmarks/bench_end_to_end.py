"""End-to-end training throughput: the GPT-3 1.3B example with Ulysses SP, mock data.

Runs ``pretrain_gpt.py``'s own machinery in-process: ``initialize_megatron`` on a built
argument list, the same model provider, ZeRO sharding, optimizer, scheduler and
``megatron.training.training.train_step_async``; random tokens stand in for data. After ``--warmup``
iterations, ``--iters`` are timed. By default they run as the training loop runs them: each
step's values are read (and the LR scheduler stepped) during the next step, just before its
optimizer step, so the CPU runs ahead; CUDA events around each call time it back to back.
``--sync-every-step`` reads every step at its end instead and times each after a barrier and
a host sync (the timing before deferred reads). Reported: tokens/s
per GPU, model TFLOP/s per GPU and MFU (``model_flops_per_token`` x tokens / time / 989e12
per GPU; recomputation not counted), ``torch.cuda.max_memory_allocated`` (max over ranks)
next to ``megatron.planning.memory_model``'s prediction, and with ``--profile`` a kernel-time
breakdown (GEMM, attention, all-to-all, other collectives, norms/elementwise, optimizer).

The stall of ``--checkpoint-in-cpu`` (iteration time with it minus without, printed when a
sweep has both): ``--sweep z1-full,z1-full-cic,z1-full-cic-ondemand`` (``ondemand``: the
earlier scheme, copies on the compute stream and inputs fetched when needed).

Modes: default (one configuration); ``--weak-scaling``: SP 1, 2, 4... on the same GPUs with
the same tokens per GPU (``--seq-length`` x SP; the rest is data parallel). The longest
sequence that fits: ``benchmarks/bench_max_seqlen.py``, which launches this script per length.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/bench_end_to_end.py --json e2e.json
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/bench_end_to_end.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist
from common import (
    H100_BF16_PEAK_FLOPS,
    add_model_shape_args,
    history_length,
    init_distributed,
    is_oom,
    log0,
    markdown_table,
    max_over_ranks,
    median,
    peak_blocks,
    peak_memory_bytes,
    record_memory_history,
    reset_peak_memory,
    stop_memory_history,
    time_ms,
    write_json,
)

import megatron  # noqa: E402  (common put the repo on sys.path)
from megatron.planning.memory_tracker import LiveBytes  # noqa: E402  (common put the repo on sys.path)

GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_shape_args(p)
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--num-key-value-heads", type=int, default=None, help="GQA (default: MHA)")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    p.add_argument(
        "--llama",
        action="store_true",
        help="SwiGLU, RMSNorm, no linear biases, untied output layer (Llama style)",
    )
    p.add_argument(
        "--tiled-mlp-chunk-size", type=int, default=0, help="model flag (tokens per MLP tile)"
    )
    p.add_argument(
        "--cpu-optimizer", action="store_true", help="optimizer state and step on the host"
    )
    p.add_argument(
        "--cpu-offload-params",
        action="store_true",
        help="ZeRO 3: parameters, gradients and optimizer state on the host (FSDP2)",
    )
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per step (global batch = micro x DP x this); Megatron-DeepSpeed's example script's "
        "global batch 2 at SP 4 on 4 GPUs is 2",
    )
    p.add_argument("--sp", type=int, default=None, help="Ulysses degree (default: all GPUs)")
    p.add_argument("--recompute", choices=["none", "full", "selective"], default="none")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    p.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope"],
        default="learned_absolute",
    )
    p.add_argument("--attention", choices=["sdpa", "triton", "classic"], default="sdpa")
    p.add_argument(
        "--sweep",
        type=str,
        default=None,
        help="several configurations in one process, comma-separated, e.g. "
        "z1,z3-full,z1-triton,z1-fp32gather,z1-cefuse,z1-fusednorm,z1-sync "
        "(see sweep_variants)",
    )
    p.add_argument("--loss-chunk-size", type=int, default=2048)
    p.add_argument("--dropout", type=float, default=0.0, help="attention and hidden dropout")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument(
        "--fused-residual-norm",
        action="store_true",
        help="model flag: each residual add + the norm after it in one Triton pass",
    )
    p.add_argument(
        "--no-bias-gelu-fusion",
        action="store_true",
        help="model flag: the MLP's bias in its first linear, GeLU unfused (fused by default)",
    )
    p.add_argument(
        "--no-bias-dropout-fusion",
        action="store_true",
        help="model flag: the output projections' biases in their linears, not in the fused "
        "residual add + norm (there by default with --fused-residual-norm)",
    )
    p.add_argument(
        "--no-loss-grad-in-forward",
        action="store_true",
        help="model flag: the chunked loss recomputes its logits in backward (its gradients "
        "come out of the forward pass by default)",
    )
    p.add_argument(
        "--no-embedding-grads-in-place",
        action="store_true",
        help="model flag: the embedding and output-layer weight gradients go through autograd",
    )
    p.add_argument(
        "--no-gradient-accumulation-fusion",
        action="store_true",
        help="model flag: ZeRO 1 over micro-batches, FSDP2 casts and sums the delayed weight "
        "gradients in fp32 (by default their GEMMs write them in fp32)",
    )
    p.add_argument(
        "--no-overlap-param-gather",
        action="store_true",
        help="ZeRO: no FSDP2 forward prefetch of the next layer's weights",
    )
    p.add_argument(
        "--no-overlap-param-gather-with-optimizer-step",
        action="store_true",
        help="ZeRO: the embeddings' and first layer's all-gathers when the next forward starts, "
        "not during the optimizer step",
    )
    p.add_argument(
        "--fp32-residual-connection",
        action="store_true",
        help="model flag: the residual stream in fp32 (default: bf16, as Megatron-LM)",
    )
    p.add_argument(
        "--no-sp-rank-major-qkv",
        action="store_true",
        help="model flag: Q/K/V projected in Megatron's layout and packed for the all-to-all",
    )
    p.add_argument(
        "--cross-entropy-loss-fusion",
        action="store_true",
        help="model flag: the chunked loss's softmax work in one Triton pass per chunk",
    )
    p.add_argument(
        "--delay-wgrad-compute",
        action="store_true",
        help="model flag: weight gradients of the MLP and output projection during the "
        "backward all-to-alls",
    )
    p.add_argument(
        "--fp32-param-gather",
        action="store_true",
        help="model flag: ZeRO gathers fp32 layer weights (autocast casts them per use)",
    )
    p.add_argument(
        "--sync-every-step",
        action="store_true",
        help="read each step's values at its end and time it after a barrier (old timing); "
        "default: read during the next step, as the training loop does, timed back to back",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--checkpoint-in-cpu", action="store_true", help="model flag (with --recompute full)"
    )
    p.add_argument(
        "--offload-on-demand",
        action="store_true",
        help="with --checkpoint-in-cpu: the earlier scheme (copies on the compute stream, each "
        "input fetched when its recomputation asks), to measure what the side streams gain",
    )
    p.add_argument(
        "--gpu-memory-cap-gib",
        type=float,
        default=0.0,
        help="let the CUDA allocator use at most this much (set_per_process_memory_fraction): "
        "shows on a larger GPU that a run fits a smaller one (0: no cap)",
    )
    p.add_argument("--profile", action="store_true", help="kernel-time breakdown of 1 iteration")
    p.add_argument(
        "--memory-peak",
        action="store_true",
        help="record the CUDA allocator's history and report the blocks alive at the peak, by "
        "the frame of this code base that allocated them (JSON memory_peak; slower)",
    )
    p.add_argument("--trace", type=str, default=None, help="with --profile: write its trace here")
    p.add_argument("--weak-scaling", action="store_true", help="SP 1, 2, 4 at equal tokens/GPU")
    p.add_argument("--timeout-minutes", type=float, default=10.0, help="process-group timeout")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="gloo on CPU with a tiny model")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cpu_smoke:  # tiny shapes; keep anything given explicitly
        for name, value in (("num_layers", 2), ("hidden_size", 64), ("num_attention_heads", 4),
                            ("vocab_size", 999), ("seq_length", 256), ("loss_chunk_size", 64)):  # fmt: skip
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
    if args.iters < 1 or args.warmup < 0 or args.grad_accum < 1:
        p.error("--iters and --grad-accum must be >= 1 and --warmup >= 0")
    try:
        args.variants = sweep_variants(args)
    except ValueError as err:
        p.error(f"--sweep {args.sweep!r}: {err}")
    if args.weak_scaling and len(args.variants) > 1:
        p.error("--weak-scaling takes one configuration: drop --sweep")
    return args


# Sweep tokens that switch a boolean setting on, and the model flags passed through as is.
SWITCH_TOKENS = {
    "fp32gather": "fp32_param_gather",
    "cefuse": "cross_entropy_loss_fusion", "fusednorm": "fused_residual_norm",
    "dwgrad": "delay_wgrad_compute", "sync": "sync_every_step", "nobgf": "no_bias_gelu_fusion",
    "packqkv": "no_sp_rank_major_qkv", "fp32res": "fp32_residual_connection",
    "noprefetch": "no_overlap_param_gather", "nobdf": "no_bias_dropout_fusion",
    "nolgf": "no_loss_grad_in_forward", "nogaf": "no_gradient_accumulation_fusion",
    "noegip": "no_embedding_grads_in_place",
    "nooptag": "no_overlap_param_gather_with_optimizer_step",
    "cic": "checkpoint_in_cpu", "ondemand": "offload_on_demand",
    "cpuopt": "cpu_optimizer", "cpuparams": "cpu_offload_params",
}  # fmt: skip
MODEL_SWITCHES = ("checkpoint_in_cpu", "cross_entropy_loss_fusion",
                  "fused_residual_norm", "delay_wgrad_compute", "no_bias_gelu_fusion",
                  "no_sp_rank_major_qkv", "fp32_residual_connection",
                  "no_bias_dropout_fusion", "no_loss_grad_in_forward",
                  "no_gradient_accumulation_fusion", "no_embedding_grads_in_place",
                  "no_overlap_param_gather",
                  "no_overlap_param_gather_with_optimizer_step", "cpu_optimizer",
                  "cpu_offload_params")  # fmt: skip


def sweep_variants(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One copy of ``args`` per ``--sweep`` entry (just ``args`` without ``--sweep``).

    An entry is tokens joined by ``-``: ``z0``..``z3`` (ZeRO stage), ``none``/``full``/
    ``selective`` (recompute), ``sdpa``/``triton``/``classic``
    (attention), ``fp32gather`` (``--fp32-param-gather``),
    ``cefuse`` (``--cross-entropy-loss-fusion``), ``fusednorm`` (``--fused-residual-norm``),
    ``sync`` (``--sync-every-step``), ``dwgrad`` (``--delay-wgrad-compute``), ``nobgf``
    (``--no-bias-gelu-fusion``), ``packqkv`` (``--no-sp-rank-major-qkv``), ``fp32res``
    (``--fp32-residual-connection``), ``noprefetch`` (``--no-overlap-param-gather``), ``nobdf``
    (``--no-bias-dropout-fusion``), ``nolgf`` (``--no-loss-grad-in-forward``), ``nogaf``
    (``--no-gradient-accumulation-fusion``), ``noegip`` (``--no-embedding-grads-in-place``),
    ``cic`` (``--checkpoint-in-cpu``), ``ondemand`` (``--offload-on-demand``), ``cpuopt``
    (``--cpu-optimizer``), ``cpuparams`` (``--cpu-offload-params``), ``nooptag``
    (``--no-overlap-param-gather-with-optimizer-step``), ``ga<N>`` (``--grad-accum``), ``mb<N>``
    (``--micro-batch-size``); unnamed settings keep their flag values.
    """
    if not args.sweep:
        return [args]
    out = []
    for spec in args.sweep.split(","):
        variant = argparse.Namespace(**vars(args))
        for token in spec.split("-"):
            if token in ("none", "full", "selective"):
                variant.recompute = token
            elif token in ("sdpa", "triton", "classic"):
                variant.attention = token
            elif token in SWITCH_TOKENS:
                setattr(variant, SWITCH_TOKENS[token], True)
            elif token[:1] == "z" and token[1:] in ("0", "1", "2", "3"):
                variant.zero_stage = int(token[1:])
            elif token[:2] == "ga" and token[2:].isdigit() and int(token[2:]) >= 1:
                variant.grad_accum = int(token[2:])
            elif token[:2] == "mb" and token[2:].isdigit() and int(token[2:]) >= 1:
                variant.micro_batch_size = int(token[2:])
            else:
                raise ValueError(f"entry {spec!r}: unknown token {token!r}")
        out.append(variant)
    return out


def megatron_args(args, seq: int, sp: int, world: int) -> list[str]:
    """The pretrain_gpt command line of this benchmark configuration."""
    dp = world // sp
    out = [
        "--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
        "--num-attention-heads", args.num_attention_heads, "--seq-length", seq,
        "--max-position-embeddings", seq, "--micro-batch-size", args.micro_batch_size,
        "--global-batch-size", args.micro_batch_size * dp * args.grad_accum, "--train-iters", 1000,
        "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
        "--attention-dropout", args.dropout, "--hidden-dropout", args.dropout,
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", args.vocab_size,
        "--ds-sequence-parallel-size", sp, "--zero-stage", args.zero_stage,
        "--loss-chunk-size", args.loss_chunk_size,
        "--position-embedding-type", args.position_embedding_type,
        "--eval-interval", 0, "--eval-iters", 0, "--log-interval", 1000, "--num-workers", 0,
        "--device", "cpu" if args.cpu_smoke else "cuda",
        "--distributed-timeout-minutes", max(1, int(args.timeout_minutes)),
    ]  # fmt: skip
    if args.precision != "fp32":
        out.append(f"--{args.precision}")
    if args.num_key_value_heads:
        out += ["--group-query-attention", "--num-query-groups", args.num_key_value_heads]
    if args.ffn_hidden_size:
        out += ["--ffn-hidden-size", args.ffn_hidden_size]
    if args.llama:
        out += ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
                "--untie-embeddings-and-output-weights"]  # fmt: skip
    if args.tiled_mlp_chunk_size:
        out += ["--tiled-mlp-chunk-size", args.tiled_mlp_chunk_size]
    if args.attention == "sdpa":
        out.append("--use-flash-attn")
    elif args.attention == "triton":
        out.append("--use-flash-attn-triton")
    if args.recompute != "none":
        out += ["--recompute-granularity", args.recompute]
    out += ["--" + name.replace("_", "-") for name in MODEL_SWITCHES if getattr(args, name)]
    if args.fp32_param_gather and args.zero_stage > 0 and args.precision != "fp32":
        out.append("--fp32-param-gather")
    return [str(x) for x in out]


class _OnDemandOffload:
    """--offload-on-demand: the earlier --checkpoint-in-cpu scheme, each copy on the compute
    stream and each input fetched when its recomputation asks for it."""

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    @staticmethod
    def pack(t):
        if not t.is_cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return t.device, host

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)


@contextlib.contextmanager
def offload_scheme(on_demand: bool):
    """The --checkpoint-in-cpu scheme of one run (the model's own unless ``on_demand``)."""
    import megatron.model.transformer as transformer

    current = transformer.HostOffload
    transformer.HostOffload = _OnDemandOffload if on_demand else current
    try:
        yield
    finally:
        transformer.HostOffload = current


def mock_batches(vocab: int, mbs: int, seq: int, seed: int):
    """Endless random-token micro-batches in the dataset's format (``text``: [b, s + 1])."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"text": torch.randint(0, vocab, (mbs, seq + 1), generator=g)}


def run_config(args, seq: int, sp: int, world: int, device: torch.device) -> dict:
    """Build the run for ``seq``/``sp``, time it and return its metrics (all ranks agree)."""
    import pretrain_gpt
    from megatron.core import parallel_state
    from megatron.core.distributed.fsdp import shard_model_for_zero
    from megatron.core.parallel_config import get_parallel_config
    from megatron.core.random import set_random_seed
    from megatron.initialize import initialize_megatron
    from megatron.model import ModelConfig, ParallelTransformerLayer, model_flops_per_token
    from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
    from megatron.optimizer.optimizer import get_megatron_optimizer
    from megatron.optimizer.optimizer_param_scheduler import get_optimizer_param_scheduler
    from megatron.planning.memory_model import RunSetup, estimate_memory
    from megatron.training.config import TrainingConfig
    from megatron.training.training import TrainState, finalize_step, train_step_async

    parallel_state.destroy_model_parallel()
    pretrain_gpt._TOKENIZER = None
    margs = initialize_megatron(args_list=megatron_args(args, seq, sp, world))
    tconfig, parallel = TrainingConfig.from_args(margs), get_parallel_config()
    state = parallel_state.get_parallel_state()
    set_random_seed(margs.seed)
    # On CPU a dispatch-mode tracker stands in for the CUDA allocator's peak statistics.
    tracker = LiveBytes() if device.type == "cpu" else None
    record_history = args.memory_peak and device.type == "cuda"
    if record_history:
        record_memory_history()
    with tracker or contextlib.nullcontext():
        with torch.device(device):  # parameters are created and initialised on the device
            model = pretrain_gpt.model_provider()
        config: ModelConfig = model.config
        model = shard_model_for_zero(
            model,
            parallel.zero_stage,
            state,
            (ParallelTransformerLayer,),
            parallel.zero_param_dtype,
            forward_prefetch=parallel.overlap_param_gather,
            offload_params=tconfig.cpu_offload_params,
            pin_memory=tconfig.offload_pin_memory,
        )
        optimizer = get_megatron_optimizer(model, tconfig)
        scheduler = get_optimizer_param_scheduler(optimizer, tconfig)
        scaler = (
            DynamicGradScaler(initial_scale=2.0**16, min_scale=1.0)
            if margs.fp16
            else ConstantGradScaler(1.0)
        )
        data = mock_batches(args.vocab_size, margs.micro_batch_size, seq, seed=state.dp_rank)
        step_no = [0]
        pending = []  # the launched step not yet read (at most one)
        ts, history = TrainState(), []

        def finish() -> None:
            """The training loop's bookkeeping of the pending step (scheduler, counters)."""
            while pending:
                finalize_step(
                    pending.pop(), tconfig.global_batch_size, ts, scheduler, tconfig, history
                )

        def step() -> None:
            step_no[0] += 1
            pending.append(
                train_step_async(
                    pretrain_gpt.forward_step, data, model, optimizer, scaler,
                    tconfig, parallel, args.grad_accum, step_no[0], before_optimizer_step=finish,
                )
            )  # fmt: skip
            if args.sync_every_step:
                finish()

        model.train()
        time_ms(step, device, args.warmup, 0)  # warm-up; the peak below is steady state
        reset_peak_memory(device)
        steady = history_length(device.index or 0) if record_history else 0
        if tracker is not None:
            tracker.reset_peak()
        times = time_ms(step, device, 0, args.iters, back_to_back=not args.sync_every_step)
        finish()
        peak = peak_memory_bytes(device) if tracker is None else tracker.peak
    at_peak = (
        peak_blocks(stop_memory_history(), device.index or 0, start=steady)
        if record_history
        else None
    )
    peak = max_over_ranks(float(peak), device)
    trace = None
    if args.trace and args.profile:  # one file per configuration of a sweep
        tag = f"s{seq}_sp{sp}_z{margs.zero_stage}_{args.recompute}_{args.attention}"
        tag += "".join(f"_{tok}" for tok, name in SWITCH_TOKENS.items() if getattr(args, name))
        tag += f"_ga{args.grad_accum}" if args.grad_accum > 1 else ""
        trace = args.trace.replace(".json", f"_{tag}.json")
    breakdown = profile_iteration(step, device, trace) if args.profile else None
    finish()
    ms = max_over_ranks(median(times), device)
    setup = RunSetup(
        num_gpus=world, sp=sp, micro_batch_size=margs.micro_batch_size,
        zero_stage=margs.zero_stage, precision=args.precision, device=device.type,
        fp32_param_gather=margs.fp32_param_gather, num_micro_batches=args.grad_accum,
        optimizer_offload=bool(margs.cpu_optimizer) and not margs.cpu_offload_params,
        param_offload=bool(margs.cpu_offload_params),
    )  # fmt: skip
    est = estimate_memory(config, setup)
    tokens = margs.global_batch_size * seq
    flops = model_flops_per_token(config, seq) * tokens
    out = {
        "seq_length": seq, "sp": sp, "dp": world // sp, "gpus": world,
        "gpu_memory_cap_gib": args.gpu_memory_cap_gib,
        "micro_batch_size": margs.micro_batch_size,
        "grad_accum": args.grad_accum, "zero_stage": margs.zero_stage, "recompute": args.recompute, "attention": args.attention,
        "checkpoint_in_cpu": args.checkpoint_in_cpu, "fp32_param_gather": margs.fp32_param_gather,
        "ce_fusion": args.cross_entropy_loss_fusion, "fused_norm": args.fused_residual_norm,
        "delay_wgrad": args.delay_wgrad_compute, "bias_gelu_fused": not args.no_bias_gelu_fusion,
        "rank_major_qkv": not args.no_sp_rank_major_qkv,
        "bias_in_fused_norm": args.fused_residual_norm and not args.no_bias_dropout_fusion,
        "fp32_residual": args.fp32_residual_connection,
        "loss_grad_in_forward": not args.no_loss_grad_in_forward,
        "grad_accum_fusion": not args.no_gradient_accumulation_fusion,
        "embedding_grads_in_place": not args.no_embedding_grads_in_place,
        "param_gather_prefetch": not args.no_overlap_param_gather,
        "param_gather_in_step": not (
            args.no_overlap_param_gather or args.no_overlap_param_gather_with_optimizer_step
        ),
        "position_embedding_type": args.position_embedding_type,
        "host_sync": "every step" if args.sync_every_step else "deferred", "ms_per_iter": ms,
        "iter_ms_all": times, "tokens_per_iter": tokens, "lm_losses": history,
        "tokens_per_s_per_gpu": tokens / (ms / 1000.0) / world,
        "tflops_per_gpu": flops / (ms / 1000.0) / world / 1e12,
        "mfu": flops / (ms / 1000.0) / world / H100_BF16_PEAK_FLOPS,
        "peak_mem_gib": peak / GIB,
        "offload_on_demand": args.offload_on_demand,
        "peak_host_rss_gib": host_peak_bytes() / GIB, "predicted_host_gib": est.host / GIB,
        "tiled_mlp_chunk_size": margs.tiled_mlp_chunk_size,
        "cpu_optimizer": bool(margs.cpu_optimizer),
        "cpu_offload_params": bool(margs.cpu_offload_params),
        "peak_mem_source": "LiveBytes (CPU tracker)" if tracker else "max_memory_allocated",
        "predicted_mem_gib": est.total / GIB, "predicted_peak_phase": est.peak_phase,
        "predicted_breakdown_gib": {k: getattr(est, k) / GIB for k in est.COMPONENTS},
        "profile": breakdown, "memory_peak": at_peak,
    }  # fmt: skip
    return out


def oom_report(err: BaseException, seq: int, sp: int, device: torch.device) -> dict:
    """What an out-of-memory error leaves to compare with the memory model: the allocator's
    whole message, the peak allocated before the failed request, and the innermost frame of
    this code base that asked for it."""
    package = os.path.dirname(megatron.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(package)]
    last = frames[-1] if frames else None
    where = f"{os.path.basename(last.filename)}:{last.lineno} ({last.name})" if last else "?"
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"seq": seq, "sp": sp, "message": " ".join(str(err).split()), "where": where,
            "peak_allocated_gib": peak / GIB}  # fmt: skip


def host_peak_bytes() -> int:
    """This process's peak resident host memory (pinned buffers included), max over ranks."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


TOP_KERNELS = 30  # listed by --profile
CATEGORIES = (  # first match wins; names lower-cased
    ("all-to-all", ("alltoall", "all_to_all", "sendrecv")),
    ("other collectives", ("nccl", "allgather", "all_gather", "reduce_scatter", "reducescatter",
                           "allreduce", "all_reduce", "broadcast", "gloo")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn", "cudnn", "bwd_dkdv", "bwd_dq",
                   "bwd_preprocess")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp", "addcdiv")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm",
              "aten::bmm", "matmul", "wgmma", "sm90_", "sm80_")),
    ("norms/elementwise", ("norm", "elementwise", "vectorized", "reduce", "softmax", "gelu",
                           "silu", "copy", "cat", "index", "embedding", "cross_entropy", "fill",
                           "mul", "add", "sub", "div", "exp", "log", "where", "aten::")),
)  # fmt: skip


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other"


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Length (ms) of the union of microsecond intervals."""
    total, end = 0.0, float("-inf")
    for t0, t1 in sorted(spans):
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total / 1000.0


PROFILED_STEP = "bench_profiled_step"


def profile_iteration(step, device: torch.device, trace: str | None = None) -> dict:
    """ms per category of one profiled iteration: GPU kernel time (CPU op time on CPU).

    Two steps run back to back under the profiler and only the second is counted (the
    kernels that start within its GPU-side span), so the CPU has run ahead as in training
    rather than starting from an idle GPU."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if dist.is_initialized():
        dist.barrier()
    with profile(activities=activities) as prof:
        step()
        with record_function(PROFILED_STEP):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace and (not dist.is_initialized() or dist.get_rank() == 0):
        os.makedirs(os.path.dirname(trace) or ".", exist_ok=True)
        prof.export_chrome_trace(trace)
    want = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    events = prof.events()
    marks = [e for e in events if e.name == PROFILED_STEP and e.device_type == want]
    lo, hi = (marks[0].time_range.start, marks[0].time_range.end) if marks else (0, float("inf"))
    per_name: dict[str, list[float]] = {}  # name -> [ms, calls]
    spans: dict[bool, list[tuple[float, float]]] = {True: [], False: []}  # is_comm -> [(t0, t1)]
    for evt in events:
        # GPU-side user annotations ("nccl:all_to_all", "Optimizer.step#AdamW.step") span the
        # kernels they launch: counting them too would count that time twice.
        if evt.device_type != want or evt.is_user_annotation:
            continue
        if not lo <= evt.time_range.start <= hi:
            continue
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if us > 0:
            entry = per_name.setdefault(evt.name, [0.0, 0])
            entry[0] += us / 1000.0
            entry[1] += 1
            comm = kernel_category(evt.name) in ("all-to-all", "other collectives")
            spans[comm].append((evt.time_range.start, min(evt.time_range.end, hi)))
    totals: dict[str, float] = {}
    kernels: list[tuple[str, str, float, int]] = []
    for name, (ms, calls) in per_name.items():
        cat = kernel_category(name)
        totals[cat] = totals.get(cat, 0.0) + ms
        kernels.append((name[:110], cat, ms, calls))
    kernels.sort(key=lambda k: -k[2])
    return {
        # GPU time covered by compute kernels / by any kernel (overlaps merged): the rest of
        # the iteration is exposed communication or idle (launch gaps, waiting).
        "compute_busy_ms": _union_ms(spans[False]),
        "busy_ms": _union_ms(spans[False] + spans[True]),
        "span_ms": (hi - lo) / 1000.0 if marks else None,  # the counted step's GPU span
        "categories": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
        "top_kernels": [list(k) for k in kernels[:TOP_KERNELS]],
    }


def report(results: list[dict], title: str) -> None:
    rows = [
        [r["seq_length"], r["sp"], r["dp"], r.get("micro_batch_size", 1), r["grad_accum"], r["zero_stage"], r["recompute"], r["attention"],
         "yes" if r["fp32_param_gather"] else "no", "yes" if r["ce_fusion"] else "no",
         "yes" if r["fused_norm"] else "no", "yes" if r.get("bias_in_fused_norm") else "no",
         "yes" if r["bias_gelu_fused"] else "no", "yes" if r.get("rank_major_qkv") else "no",
         "fp32" if r.get("fp32_residual") else "bf16",
         "yes" if r.get("param_gather_prefetch", True) else "no", "yes" if r["delay_wgrad"] else "no",
         "yes" if r.get("loss_grad_in_forward") else "no", "yes" if r.get("grad_accum_fusion") else "no",
         "yes" if r.get("param_gather_in_step") else "no", r["host_sync"], r["ms_per_iter"], min(r["iter_ms_all"]),
         r["tokens_per_s_per_gpu"], r["tflops_per_gpu"], 100.0 * r["mfu"],
         r["peak_mem_gib"], r["predicted_mem_gib"], f"{r['lm_losses'][0]:.5f}", f"{r['lm_losses'][-1]:.5f}"]
        for r in results
    ]  # fmt: skip
    headers = ["seq", "SP", "DP", "micro-batch size", "micro-batches", "ZeRO", "recompute", "attention",
               "fp32 gather", "CE fused", "norm fused", "biases in norm", "bias-GeLU fused", "QKV in send order", "residual", "gather prefetch", "wgrad delayed", "loss grad in fwd", "grad-accum fusion", "gather in step", "host sync", "ms/iter", "min ms", "tokens/s/GPU", "TFLOP/s/GPU", "MFU %", "peak GiB",
               "predicted GiB", "loss step 1", "loss last"]  # fmt: skip
    log0(f"\n{title}\n\n{markdown_table(headers, rows)}")
    long_rows = [
        [r["seq_length"], r.get("tiled_mlp_chunk_size", 0), "yes" if r["checkpoint_in_cpu"] else "no",
         "yes" if r.get("cpu_optimizer") else "no", "yes" if r.get("cpu_offload_params") else "no",
         r["ms_per_iter"] / 1000.0, 100.0 * r["mfu"], r["peak_mem_gib"], r["predicted_mem_gib"],
         r.get("peak_host_rss_gib", 0.0), r.get("predicted_host_gib", 0.0)]
        for r in results
    ]  # fmt: skip
    log0("\nmemory and offloads (host: peak resident memory of the process, predicted: the "
         "offloaded bytes alone):\n\n" + markdown_table(
        ["seq", "MLP tile", "ckpt in CPU", "CPU optimizer", "params on host", "s/iter", "MFU %",
         "peak GPU GiB", "predicted GPU GiB", "peak host GiB", "predicted host GiB"], long_rows))  # fmt: skip
    plain = {
        r["seq_length"]: r["ms_per_iter"] for r in reversed(results) if not r["checkpoint_in_cpu"]
    }
    stalls = [
        [r["seq_length"], "earlier (on demand)" if r.get("offload_on_demand") else "side streams",
         r["ms_per_iter"] - plain[r["seq_length"]], r["peak_mem_gib"]]
        for r in results if r["checkpoint_in_cpu"] and r["seq_length"] in plain
    ]  # fmt: skip
    if stalls:
        log0("\n--checkpoint-in-cpu stall (ms/iteration with it minus without):\n\n"
             + markdown_table(["seq", "scheme", "stall ms", "peak GPU GiB"], stalls))  # fmt: skip
    for r in results:
        if r["profile"]:
            cats = r["profile"]["categories"]
            total = sum(cats.values())
            prow = [[k, v, 100.0 * v / total] for k, v in cats.items()]
            log0(f"\nprofile, seq {r['seq_length']} SP {r['sp']} ZeRO {r['zero_stage']} recompute "
                 f"{r['recompute']} "
                 f"fp32 gather {r['fp32_param_gather']} CE fused {r['ce_fusion']} norm fused "
                 f"{r['fused_norm']} host sync "
                 f"{r['host_sync']} (kernel time; collectives "
                 f"overlap compute, so the sum can exceed the iteration):\n")  # fmt: skip
            log0(markdown_table(["category", "ms", "% of kernel time"], prow))
            log0(f"\nGPU busy with compute kernels {r['profile']['compute_busy_ms']:.1f} ms, "
                 f"with any kernel {r['profile']['busy_ms']:.1f} ms; the profiled step's GPU "
                 f"span {r['profile']['span_ms'] or float('nan'):.1f} ms (timed median "
                 f"{r['ms_per_iter']:.1f} ms)")  # fmt: skip
            log0("\ntop kernels:\n")
            log0(markdown_table(["kernel", "category", "ms", "calls"], r["profile"]["top_kernels"]))
    for r in results:
        if r["memory_peak"]:
            m = r["memory_peak"]
            log0(f"\nallocated at the peak, seq {r['seq_length']}: {m['peak_gib']:.2f} GiB "
                 f"(predicted {r['predicted_mem_gib']:.2f}, {r['predicted_peak_phase']}; "
                 f"predicted components: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in r["predicted_breakdown_gib"].items() if v)
                 + ")\n")  # fmt: skip
            log0(markdown_table(["GiB", "blocks", "allocated at"], m["by_where"][:30]))
            log0("\nlargest blocks:\n")
            log0(markdown_table(["GiB", "allocated at"], m["largest"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host_collectives = args.cpu_optimizer or args.cpu_offload_params
    rank, world, device = init_distributed(args.cpu_smoke, args.timeout_minutes, host_collectives)
    if args.gpu_memory_cap_gib > 0 and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_cap_gib * GIB / total))
        log0(f"CUDA allocator capped at {args.gpu_memory_cap_gib:g} GiB of {total / GIB:.1f}")
    elif args.gpu_memory_cap_gib > 0:
        log0("--gpu-memory-cap-gib has no effect without a CUDA device")
    if args.weak_scaling:
        degrees = [sp for sp in (1, 2, 4, 8, 16) if sp <= world and world % sp == 0]
        degrees = [sp for sp in degrees if args.num_attention_heads % sp == 0]
        configs = [(args.seq_length * sp, sp, v) for sp in degrees for v in args.variants]
    else:
        sp = args.sp or world
        configs = [(args.seq_length, sp, v) for v in args.variants]
    results, status = [], "ok"
    for seq, sp, variant in configs:
        log0(
            f"> seq {seq}, SP {sp}, DP {world // sp}, ZeRO {variant.zero_stage}, recompute "
            f"{variant.recompute}, attention {variant.attention}: {args.warmup} warm-up + "
            f"{args.iters} timed, host sync "
            f"{'every step' if args.sync_every_step else 'deferred (back to back)'}"
        )
        try:
            with offload_scheme(variant.offload_on_demand):
                results.append(run_config(variant, seq, sp, world, device))
            free_memory(device)
        except Exception as err:  # OOM: report it (the max-seqlen driver reads the JSON)
            if not is_oom(err):
                raise
            status = "oom"
            oom = oom_report(err, seq, sp, device)
            log0(f"> out of memory at seq {seq} SP {sp} in {oom['where']}: {oom['message']}")
            break
    title = (
        f"End-to-end GPT {args.num_layers} layers x {args.hidden_size}, {args.num_attention_heads} "
        f"heads, {args.precision}, attention {args.attention}, {args.position_embedding_type}, "
        f"{world} {'CPU ranks' if args.cpu_smoke else 'GPUs'}"
    )
    if results:
        report(results, title)
    payload = {"benchmark": "end_to_end", "status": status, "args": vars(args), "results": results}
    if status == "oom":
        payload["oom"] = oom
    if args.weak_scaling and len(results) > 1:
        base = results[0]["tflops_per_gpu"]
        payload["weak_scaling_efficiency"] = {r["sp"]: r["tflops_per_gpu"] / base for r in results}
        log0("\nweak scaling (per-GPU model TFLOP/s relative to SP 1): " + ", ".join(
            f"SP {r['sp']}: {r['tflops_per_gpu'] / base:.3f}" for r in results))  # fmt: skip
    write_json(args.json, payload)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
