"""Shared helpers of the benchmarks: process group, timing, tables, JSON, A/B comparison.

Every benchmark runs under ``torchrun`` on GPUs (NCCL) or, with ``--cpu-smoke``, on CPU
with gloo at tiny sizes so the code path can be checked without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


H100_BF16_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of one H100 SXM


def add_model_shape_args(parser: argparse.ArgumentParser) -> None:
    """The GPT's shape flags, the GPT-3 1.3B example by default (end-to-end and max-seqlen runs)."""
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--num-attention-heads", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=50256, help="NullTokenizer ids (+EOD)")


def init_distributed(
    cpu_smoke: bool, timeout_minutes: float = 10.0, host_collectives: bool = False
) -> tuple[int, int, torch.device]:
    """Start the default process group from torchrun's environment; (rank, world, device).
    ``host_collectives``: gloo next to NCCL (collectives over host tensors: offloads)."""
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
            "gloo" if cpu_smoke else "cpu:gloo,cuda:nccl" if host_collectives else "nccl",
            timeout=timedelta(minutes=timeout_minutes),
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


# The blocks alive at the peak (bench_end_to_end --memory-peak): the CUDA allocator's history
# (allocations and frees with the Python stack that asked) replayed, each block named by the
# innermost frame of this code base (autograd's backward of built-in ops has no Python frame:
# "(autograd)"). A block counts from its alloc to its free_requested (its free_completed waits
# for the streams that used it, but the allocator's statistics drop it at the request), as
# torch.cuda.max_memory_allocated counts, so the two peaks agree.

HISTORY_ENTRIES = 2_000_000  # allocator events kept (a 4-layer iteration makes tens of thousands)


def record_memory_history() -> None:
    torch.cuda.memory._record_memory_history(
        enabled="all", context="alloc", stacks="python", max_entries=HISTORY_ENTRIES
    )


def stop_memory_history() -> dict:
    """The history so far; recording stops."""
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snapshot


def allocated_at(frames: list[dict], root: str = str(REPO) + os.sep) -> str:
    """The innermost frame under ``root`` (frames come innermost first): file:line (function)."""
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(root):
            return f"{os.path.relpath(name, root)}:{f.get('line')} ({f.get('name')})"
    return "(autograd)" if not frames else f"(outside: {frames[0].get('name', '?')})"


def history_length(device: int = 0) -> int:
    """Events recorded so far (``start`` of :func:`peak_blocks`: the peak after this point)."""
    return len(torch.cuda.memory._snapshot()["device_traces"][device])


def peak_blocks(
    snapshot: dict, device: int = 0, root: str = str(REPO) + os.sep, top: int = 25, start: int = 0
) -> dict:
    """The blocks alive when ``device``'s allocated total was highest at or after event
    ``start`` (the events before it only build up what is alive): that total (GiB), the
    largest blocks ([GiB, where]) and the bytes by where ([GiB, blocks, where]), largest first."""
    events = snapshot["device_traces"][device]
    sizes: dict[int, int] = {}
    total = peak = 0
    peak_at = -1
    for i, e in enumerate(events):  # first pass: when the peak happens
        if e["action"] == "alloc":
            sizes[e["addr"]] = e["size"]
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in sizes:
            total -= sizes.pop(e["addr"])
        if i >= start and (peak_at < start or total > peak):
            peak, peak_at = total, i
    live: dict[int, tuple[int, str]] = {}
    for e in events[: peak_at + 1]:  # second pass: what is alive then
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], allocated_at(e.get("frames", []), root))
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    by_where: dict[str, list[int]] = {}
    for size, where in live.values():
        entry = by_where.setdefault(where, [0, 0])
        entry[0] += size
        entry[1] += 1
    gib = 1024.0**3
    return {
        "peak_gib": peak / gib,
        "largest": [
            [round(size / gib, 3), where] for size, where in sorted(live.values())[::-1][:top]
        ],
        "by_where": [
            [round(b / gib, 3), n, where]
            for where, (b, n) in sorted(by_where.items(), key=lambda kv: -kv[1][0])
        ],
    }


# A/B comparison of two commits: the rule every speed comparison follows.


@dataclass
class ABResult:
    """The runs of one A/B comparison and its verdict (see :func:`ab_compare`)."""

    base: str
    head: str
    base_values: list[float]
    head_values: list[float]
    higher_is_better: bool = False

    @property
    def base_median(self) -> float:
        return median(self.base_values)

    @property
    def head_median(self) -> float:
        return median(self.head_values)

    @property
    def ratio(self) -> float:
        """head median / base median."""
        return self.head_median / self.base_median

    @property
    def verdict(self) -> str:
        """``no change`` when head's median lies inside the base runs' spread (min-max),
        else ``faster`` or ``slower``."""
        lo, hi = min(self.base_values), max(self.base_values)
        if lo <= self.head_median <= hi:
            return "no change"
        better = (self.head_median > hi) if self.higher_is_better else (self.head_median < lo)
        return "faster" if better else "slower"

    @property
    def change_percent(self) -> float:
        return abs(self.ratio - 1.0) * 100.0

    def report(self) -> str:
        rows = [
            [side, rev[:10], median(vals), min(vals), max(vals), ", ".join(f"{v:g}" for v in vals)]
            for side, rev, vals in (
                ("base (A)", self.base, self.base_values),
                ("head (B)", self.head, self.head_values),
            )
        ]
        table = markdown_table(["side", "commit", "median", "min", "max", "runs"], rows)
        lo, hi = min(self.base_values), max(self.base_values)
        if self.verdict == "no change":
            why = (
                f"(head's median {self.head_median:g} lies inside the base runs' spread "
                f"{lo:g}-{hi:g}): noise; do not re-run to chase it"
            )
        else:
            why = (
                f"by {self.change_percent:.1f}% (head's median {self.head_median:g} is outside "
                f"the base runs' spread {lo:g}-{hi:g})"
            )
        better = "higher" if self.higher_is_better else "lower"
        return (
            f"{table}\n\nhead/base median: {self.ratio:.4f} ({better} is better)\n"
            f"verdict: {self.verdict} {why}"
        )


def read_metric(
    output: str,
    metric: str | None = None,
    json_file: Path | None = None,
    json_key: str | None = None,
) -> float:
    """One number from a run: the last match of the regex ``metric`` in its output (its first
    group if it has one), or ``json_key`` (dotted, list indices as numbers, e.g.
    ``results.0.ms_per_iter``) of the JSON file the run wrote."""
    if json_key is not None:
        if json_file is None or not json_file.exists():
            raise ValueError(f"the run wrote no JSON file ({json_file}); pass {{json}} to it")
        value = json.loads(json_file.read_text(encoding="utf-8"))
        for part in json_key.split("."):
            value = value[int(part)] if isinstance(value, list) else value[part]
        return float(value)
    if metric is None:
        raise ValueError("give a metric regex or a JSON key")
    matches = list(re.finditer(metric, output, flags=re.MULTILINE))
    if not matches:
        raise ValueError(f"no match of {metric!r} in the run's output")
    last = matches[-1]
    return float(last.group(1) if last.re.groups else last.group(0))


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def ab_compare(
    command: Sequence[str],
    base: str,
    head: str = "HEAD",
    repo: Path = REPO,
    pairs: int = 5,
    metric: str | None = None,
    json_key: str | None = None,
    higher_is_better: bool = False,
    timeout_s: float | None = None,
    log: Callable[[str], None] = print,
) -> ABResult:
    """Run ``command`` in a fresh worktree of ``base`` (A) and of ``head`` (B), interleaved
    A B A B ... ``pairs`` times, and read one number per run (:func:`read_metric`).

    Each run starts in its worktree's root with that root first on ``PYTHONPATH``; an
    argument ``{json}`` in ``command`` becomes a fresh JSON path for the run (``json_key``
    reads it). A run that fails or yields no number stops the comparison."""
    if pairs < 1:
        raise ValueError("pairs must be >= 1")
    repo = Path(repo).resolve()
    revs = {side: _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
            for side, rev in (("A", base), ("B", head))}  # fmt: skip
    values: dict[str, list[float]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="ab_") as tmp:
        trees = {side: Path(tmp) / side for side in revs}
        try:
            for side, rev in revs.items():
                _git(repo, "worktree", "add", "--detach", "--quiet", str(trees[side]), rev)
            for i in range(pairs):
                for side in ("A", "B"):
                    out_json = Path(tmp) / f"run_{i}_{side}.json"
                    argv = [a.replace("{json}", str(out_json)) for a in command]
                    env = dict(os.environ)
                    env["PYTHONPATH"] = os.pathsep.join(
                        p for p in (str(trees[side]), env.get("PYTHONPATH")) if p
                    )
                    done = subprocess.run(
                        argv, cwd=trees[side], env=env, capture_output=True, text=True,
                        timeout=timeout_s,
                    )  # fmt: skip
                    output = done.stdout + done.stderr
                    if done.returncode != 0:
                        tail = "\n".join(output.splitlines()[-30:])
                        raise RuntimeError(
                            f"run {i + 1} of {side} exited {done.returncode}:\n{tail}"
                        )
                    value = read_metric(output, metric, out_json, json_key)
                    values[side].append(value)
                    log(f"  pair {i + 1}/{pairs} {side} {revs[side][:10]}: {value:g}")
        finally:
            for tree in trees.values():
                if tree.exists():
                    _git(repo, "worktree", "remove", "--force", str(tree))
            _git(repo, "worktree", "prune")
    return ABResult(revs["A"], revs["B"], values["A"], values["B"], higher_is_better)
