"""The longest sequence a model trains on, and the settings that get there.

:func:`find_max_seq` tries a ladder of settings, each adding one memory saving to the one
before (full recompute, the tiled MLP, ``--checkpoint-in-cpu``, the optimizer offload, the
parameter offload under ZeRO 3), finds for each the longest sequence whose predicted peak
fits the GPU budget and whose host memory (per node: per GPU x GPUs per node) fits the host
budget, and returns the longest, the earliest rung on a tie. All GPUs are one Ulysses group
(the largest degree the heads allow), so each holds ``s / N`` tokens.

:func:`host_memory_warning` is the one start-up line when the predicted host memory of this
node exceeds what ``/proc/meminfo`` says is available.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

from megatron.model.config import ModelConfig
from megatron.planning.memory_model import (
    GIB,
    MemoryEstimate,
    RunSetup,
    estimate_memory,
    valid_sp_degrees,
)

TOKEN_GRAIN = 1024  # local tokens per GPU are a multiple of this
# Each GPU process's own resident host memory beside what it offloads (the CUDA context,
# PyTorch and its libraries, staging buffers): 3.6 and 4.3 GiB measured on one H100 with
# torch 2.11 (the 1.3B at 512K and the Llama-3-8B shape at 512,000 tokens).
PROCESS_HOST_BYTES = 4 * GIB
MIN_TILED_TOKENS = 8192  # fewer local tokens: the MLP's intermediate is small, no tiling


def recommended_tile(config: ModelConfig, local_tokens: int) -> int:
    """``--tiled-mlp-chunk-size`` for ``local_tokens`` per GPU: the largest power of two
    whose ``[chunk, up]`` intermediate is no wider than the ``[s/p, h]`` residual stream
    (``up`` is ``2 ffn`` with SwiGLU), at least 1024; 0 (off) below 8192 tokens."""
    if local_tokens < MIN_TILED_TOKENS:
        return 0
    up = config.ffn_hidden_size * (2 if config.swiglu else 1)
    target = max(TOKEN_GRAIN, local_tokens * config.hidden_size // up)
    chunk = 1 << (target.bit_length() - 1)
    return chunk if chunk < local_tokens else 0


@dataclass(frozen=True)
class Rung:
    """One setting of the ladder: its name, the flags it adds and what it changes."""

    name: str
    flags: tuple[str, ...]
    impl: dict
    setup: dict
    tiled: bool = False


LADDER = (
    Rung("as given", (), {}, {}),
    Rung(
        "full recompute",
        ("--recompute-granularity full",),
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        {},
    ),
    Rung("+ tiled MLP", ("--tiled-mlp-chunk-size N",), {}, {}, tiled=True),
    Rung("+ activation offload", ("--checkpoint-in-cpu",), {"checkpoint_in_cpu": True}, {}),
    Rung("+ optimizer offload", ("--cpu-optimizer",), {}, {"optimizer_offload": True}),
    Rung(
        "+ parameter offload",
        ("--cpu-offload-params --zero-stage 3",),
        {},
        {"param_offload": True, "zero_stage": 3, "optimizer_offload": False},
    ),
)


@dataclass
class Plan:
    rung: str
    flags: list[str]
    seq_length: int
    sp: int
    estimate: MemoryEstimate | None


def _rung_configs(config: ModelConfig, setup: RunSetup):
    """(rung, cumulative config changes, cumulative setup changes) up the ladder."""
    impl: dict = {}
    changes: dict = {}
    tiled = False
    flags: list[str] = []
    for rung in LADDER:
        impl.update(rung.impl)
        changes.update(rung.setup)
        tiled = tiled or rung.tiled
        flags += rung.flags
        if rung.setup.get("param_offload"):  # the parameter offload takes the optimizer along
            flags = [f for f in flags if f != "--cpu-optimizer"]
        if changes.get("optimizer_offload") and setup.zero_stage == 0:
            changes.setdefault("zero_stage", 1)
        yield rung, dict(impl), dict(changes), tiled, list(flags)


def _estimate(config, setup, seq, impl, changes, tiled):
    local = seq * setup.micro_batch_size // setup.sp
    extra = {"tiled_mlp_chunk_size": recommended_tile(config, local) if tiled else 0}
    if config.position_embedding_type == "learned_absolute":
        extra["max_position_embeddings"] = seq
    c = replace(config, seq_length=seq, **impl, **extra)
    return c, estimate_memory(c, replace(setup, **changes))


def find_max_seq(
    config: ModelConfig,
    setup: RunSetup,
    gpu_budget: int,
    host_budget_per_node: int,
    gpus_per_node: int,
    max_seq: int = 1 << 26,
) -> tuple[Plan | None, list[Plan]]:
    """The longest sequence over the ladder (None if not even the shortest fits), and each
    rung's own longest. ``setup``'s SP degree is replaced by the largest valid one."""
    sp = max(valid_sp_degrees(replace(config, seq_length=setup.num_gpus), setup.num_gpus))
    setup = replace(setup, sp=sp)
    grain = TOKEN_GRAIN * sp
    tried: list[Plan] = []
    for rung, impl, changes, tiled, flags in _rung_configs(config, setup):

        def fits(m: int, impl=impl, changes=changes, tiled=tiled) -> MemoryEstimate | None:
            _, est = _estimate(config, setup, m * grain, impl, changes, tiled)
            host_ok = (est.host + PROCESS_HOST_BYTES) * gpus_per_node <= host_budget_per_node
            return est if est.total <= gpu_budget and host_ok else None

        lo, hi = 0, max_seq // grain  # fits(lo) (or lo = 0: nothing); find the largest m
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        seq = lo * grain
        est = fits(lo) if lo else None
        if tiled and lo:
            chunk = recommended_tile(config, seq * setup.micro_batch_size // sp)
            flags = [f.replace(" N", f" {chunk}") if "tiled" in f else f for f in flags]
            flags = [f for f in flags if not f.endswith(" 0")]
        tried.append(Plan(rung.name, flags, seq, sp, est))
    best = max(tried, key=lambda p: p.seq_length)  # max() keeps the earliest on a tie
    return (best if best.seq_length else None), tried


def _mem_available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def setup_from_args(
    args: argparse.Namespace, sp: int | None = None, cp: int | None = None
) -> RunSetup:
    """The :class:`RunSetup` of validated training arguments (``sp``, ``cp``: other Ulysses
    and ring degrees than the arguments')."""
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    sp = args.ds_sequence_parallel_size if sp is None else sp
    cp = args.context_parallel_size if cp is None else cp
    gpus = args.world_size if getattr(args, "num_gpus", None) is None else args.num_gpus
    per_step = args.micro_batch_size * (gpus // (sp * cp))  # samples per micro-batch step
    return RunSetup(
        num_gpus=gpus,
        sp=sp,
        cp=cp,
        micro_batch_size=args.micro_batch_size,
        zero_stage=args.zero_stage,
        precision=precision,
        device="cpu" if args.device == "cpu" else "cuda",
        fp32_param_gather=args.fp32_param_gather,
        num_micro_batches=max(1, (args.global_batch_size or per_step) // per_step),
        optimizer_offload=bool(args.cpu_optimizer or args.optimizer_cpu_offload)
        and not args.cpu_offload_params,
        param_offload=bool(args.cpu_offload_params),
    )


def host_memory_warning(
    config: ModelConfig, setup: RunSetup, local_gpus: int, meminfo: str = "/proc/meminfo"
) -> str | None:
    """One line when the predicted host memory of ``local_gpus`` processes on this node (what
    they offload and :data:`PROCESS_HOST_BYTES` each) exceeds MemAvailable; None when it fits
    or nothing is offloaded."""
    per_gpu = estimate_memory(config, setup).host
    if per_gpu == 0:
        return None
    available = _mem_available_bytes(meminfo)
    need = (per_gpu + PROCESS_HOST_BYTES) * local_gpus
    if available is None or need <= available:
        return None
    return (
        f"WARNING: predicted host memory {need / GIB:.1f} GiB ({local_gpus} GPU processes x "
        f"({per_gpu / GIB:.1f} GiB offloaded + {PROCESS_HOST_BYTES / GIB:.0f} GiB of their own)) "
        f"exceeds MemAvailable {available / GIB:.1f} GiB on this node "
        "(tools/estimate_memory.py --find-max-seq suggests settings)"
    )


def local_process_count(world_size: int) -> int:
    """GPU processes on this node: torchrun's LOCAL_WORLD_SIZE, else the world size."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


__all__ = [
    "PROCESS_HOST_BYTES",
    "Plan",
    "find_max_seq",
    "host_memory_warning",
    "recommended_tile",
    "setup_from_args",
]
