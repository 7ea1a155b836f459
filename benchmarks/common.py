"""Shared helpers of the distributed benchmarks: process group, timing, tables, JSON.

Every benchmark runs under ``torchrun`` on GPUs (NCCL) or, with ``--cpu-smoke``, on CPU
with gloo at tiny sizes so the code path can be checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of one H100 SXM


def add_model_shape_args(parser: argparse.ArgumentParser) -> None:
    """The GPT's shape flags, the 1.3B anchor by default (end-to-end and max-seqlen runs)."""
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-attention-heads", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=50256, help="NullTokenizer ids (+EOD)")


def init_distributed(
    cpu_smoke: bool, timeout_minutes: float = 10.0
) -> tuple[int, int, torch.device]:
    """Start the default process group from torchrun's environment; (rank, world, device)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        if not cpu_smoke and not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU is visible; use --cpu-smoke to check the code path on CPU")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not cpu_smoke:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            "gloo" if cpu_smoke else "nccl", timeout=timedelta(minutes=timeout_minutes)
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu_smoke:
        return rank, world, torch.device("cpu")
    return rank, world, torch.device("cuda", torch.cuda.current_device())


def log0(*args) -> None:
    """Print on rank 0 only (flushed: torchrun interleaves the ranks' output)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def time_ms(
    fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    iters: int,
    group: dist.ProcessGroup | None = None,
    barrier: bool = True,
    back_to_back: bool = False,
) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones.

    Default (``synced``): every call starts after a barrier and a host sync (all ranks
    aligned, the GPU idle), so the CPU's time to launch the first kernels is counted.
    ``back_to_back``: one barrier, then the calls are launched one after another as in a
    training loop; CUDA events around each call give its GPU time while the CPU runs ahead.
    CPU smoke runs are timed with ``perf_counter``."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            if barrier and dist.is_initialized():
                dist.barrier(group=group)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        return times
    events = []
    if back_to_back:
        if barrier and dist.is_initialized():
            dist.barrier(group=group)
        torch.cuda.synchronize(device)
    for _ in range(iters):
        if not back_to_back:
            if barrier and dist.is_initialized():
                dist.barrier(group=group)
            torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
        if not back_to_back:
            end.synchronize()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def max_over_ranks(
    value: float, device: torch.device, group: dist.ProcessGroup | None = None
) -> float:
    """The largest ``value`` of all ranks (e.g. the slowest rank's time, the largest peak)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict:
    """What the numbers were measured on."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` (plus the environment) as JSON from rank 0."""
    if path is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"environment": environment(), **payload}, f, indent=2, default=str)
    log0(f"wrote {path}")


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
