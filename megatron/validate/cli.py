"""``python -m megatron.validate``: check that this install trains the right model.

One GPU::

    python -m megatron.validate                      # every row; exit status 1 on any FAIL
    python -m megatron.validate --only 'llama/.*docs'
    torchrun --nproc-per-node 4 -m megatron.validate # adds SP 2 and SP 4 rows
    python -m megatron.validate --device cpu         # small shapes, fp32, Triton interpreter

Each row is one forward + backward compared with an fp32 reference
(:mod:`megatron.validate.gradcheck`); the table gives the kernels seen, the worst parameter's
gradient error against its tolerance, the lowest cosine similarity, the loss error, the
seconds the row took and PASS, FAIL or SKIP (with the reason; a SKIP never counts as a pass).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

BASELINE_FILE = Path(__file__).with_name("baseline.json")
FLOOR = 1e-2  # smallest gradient tolerance, and the loss's relative tolerance
MIN_COSINE = 0.999


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m megatron.validate",
        description="Gradient checks of every attention backend and fast path against an "
        "fp32 reference, on this machine's GPU (or CPU).",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--only", metavar="PATTERN", help="rows whose name matches this regex")
    p.add_argument("--list", action="store_true", help="print the row names and exit")
    p.add_argument(
        "--self-test",
        action="store_true",
        help="remove the guard against torch 2.11's wrong cuDNN attention gradients "
        "(megatron.ops.contiguous_grad) and run the cuDNN rows: at least one must FAIL",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--golden",
        metavar="MODEL",
        help="instead: train MODEL (gpt or llama) and compare its loss curve with the stored "
        "one (python -m megatron.validate.golden --help lists its options)",
    )
    p.add_argument(
        "--measure-baseline",
        metavar="FILE",
        help="write the classic rows' gradient errors as the noise baseline (JSON); the "
        "committed one is megatron/validate/baseline.json",
    )
    return p.parse_args(argv)


def _versions(device_type: str) -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    if device_type == "cuda":
        parts.insert(0, torch.cuda.get_device_name())
        parts.append(f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    try:
        import triton

        parts.append(f"Triton {triton.__version__}")
    except ImportError:
        parts.append("no Triton")
    try:
        import flash_attn

        parts.append(f"flash_attn {flash_attn.__version__}")
    except ImportError:
        parts.append("no flash_attn")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        parts.append(f"commit {commit}")
    return ", ".join(parts)


def skip_reason(row, device_type: str) -> str | None:
    """Why ``row`` cannot run here, or None."""
    from megatron.model.attention_backends import _load_flash_attn
    from megatron.validate.rows import model_shape

    shape = model_shape(row.model, device_type)
    if row.flash_attn and (device_type != "cuda" or _load_flash_attn() is None):
        return "the flash_attn package is not installed" if device_type == "cuda" else "CUDA only"
    if "blockwise" in row.expect and shape.get("num_key_value_heads"):
        return "blockwise attention needs as many K/V heads as query heads (GQA runs one call)"
    return None


def _select(rows, pattern: str | None):
    if not pattern:
        return rows
    rx = re.compile(pattern)
    return [r for r in rows if rx.search(r.name)]


def main(argv: list[str] | None = None, model_hook=None) -> int:
    """The command; returns its exit status. ``model_hook(model)`` runs on every row's model
    after its weights are loaded (tests inject errors through it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--golden" in argv:  # one loss curve: megatron.validate.golden
        from megatron.validate import golden

        i = argv.index("--golden")
        return golden.main(argv[:i] + ["--model"] + argv[i + 1 :])
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cpu":
        # Before any Triton kernel is defined: the interpreter runs them on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from megatron.validate.rows import single_gpu_rows, sp_rows

    rows = single_gpu_rows(args.device) + sp_rows(world, args.device)
    if args.self_test:
        rows = [r for r in rows if "cudnn" in r.expect or "cpu-flash" in r.expect]
    rows = _select(rows, args.only)
    if args.list:
        print("\n".join(r.name + ("" if r.sp == 1 else "  (torchrun)") for r in rows))
        return 0
    if not rows:
        print(f"validate: --only {args.only!r} matches no row (see --list)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "validate: --device cuda, but PyTorch sees no CUDA device; check the driver and "
            "CUDA_VISIBLE_DEVICES, or run --device cpu for the CPU check",
            file=sys.stderr,
        )
        return 2
    from megatron.ops.flash_attn_triton_fwd import set_autotune

    set_autotune(False)  # one fixed configuration per shape: no minutes of autotuning
    if args.self_test:
        import megatron.model.attention_backends as backends

        backends.contiguous_grad = lambda x: x
    return _run(args, rows, world, model_hook)


def _run(args, rows, world: int, model_hook) -> int:
    import torch
    import torch.distributed as dist

    from megatron.validate.gradcheck import Checker, Result

    rank = 0
    device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank = dist.get_rank()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    baseline = _load_baseline(args.device)
    checker = Checker(device, baseline, FLOOR, MIN_COSINE, model_hook)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"validate: {_versions(args.device)}")
    if args.self_test:
        say("validate: self-test: the contiguous_grad guard is removed; a cuDNN row must FAIL")
    groups = {}
    results: list[Result] = []
    for row in rows:
        reason = skip_reason(row, args.device)
        if row.sp > 1 and reason is None:
            if world % row.sp:
                reason = f"SP {row.sp} does not divide the {world} processes"
            elif row.sp not in groups:
                groups[row.sp] = _sp_group(row.sp, world)
        if reason is not None:
            results.append(Result(row, "SKIP", 0.0, set(), reason=reason))
        else:
            result = checker.run(row, groups.get(row.sp))
            if world > 1:  # a row fails when it fails on any rank
                flag = torch.tensor([result.status == "FAIL"], dtype=torch.float32, device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and result.status != "FAIL":
                    result.status, result.reason = "FAIL", "failed on another rank"
            results.append(result)
        say(_line(results[-1]), flush=True)
    code = _summary(results, say)
    if rank == 0 and args.json:
        _write_json(args.json, results, args.device)
    if rank == 0 and args.measure_baseline:
        _write_baseline(args.measure_baseline, results, args.device, argv_text=sys.argv)
    if world > 1:
        dist.destroy_process_group()
    return code


def _sp_group(sp: int, world: int):
    """This rank's group of ``sp`` contiguous ranks (every rank creates every group)."""
    import torch.distributed as dist

    mine = None
    for start in range(0, world, sp):
        group = dist.new_group(list(range(start, start + sp)))
        if start <= dist.get_rank() < start + sp:
            mine = group
    return mine


HEADER = (
    f"{'row':<28} {'kernels seen':<34} {'grad err':>9} {'tol':>8} {'min cos':>9} "
    f"{'loss err':>9} {'s':>6}  status"
)


def _line(r) -> str:
    if r.status == "SKIP":
        return f"{r.row.name:<28} {'-':<34} {'':>9} {'':>8} {'':>9} {'':>9} {0:>6.1f}  SKIP: {r.reason}"
    seen = ",".join(sorted(r.seen & _SHOWN)) or "-"
    return (
        f"{r.row.name:<28} {seen:<34} {r.worst_err:>9.2e} {r.worst_tol:>8.1e} {r.min_cos:>9.6f} "
        f"{r.loss_err:>9.1e} {r.seconds:>6.1f}  {r.status}"
    )


_SHOWN = {
    "classic",
    "cudnn",
    "flash",
    "efficient",
    "math",
    "cpu-flash",
    "triton",
    "triton-fused-dq",
    "triton-step",
    "flash_attn",
    "blockwise",
    "add-norm",
    "bias-gelu",
    "ce-fused",
    "in-place-grads",
    "host-offload",
    "host-optimizer",
    "tiled-mlp",
    "all-to-all",
    "rank-major",
    "delayed-wgrad",
    "ring",
    "rope",
    "triton-kernels",
}


def _summary(results, say) -> int:
    say("")
    say(HEADER)
    for r in results:
        say(_line(r))
    failed = [r for r in results if r.status == "FAIL"]
    for r in failed:
        say(f"FAIL {r.row.name}: {r.reason}")
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    total = sum(r.seconds for r in results)
    say(
        f"validate: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP "
        f"in {total:.0f} s"
    )
    return 1 if failed or counts["PASS"] == 0 else 0


def _load_baseline(device_type: str) -> dict:
    data = json.loads(BASELINE_FILE.read_text()) if BASELINE_FILE.exists() else {}
    return data.get(device_type, {})


def _write_json(path: str, results, device_type: str) -> None:
    out = [
        {
            "row": r.row.name,
            "status": r.status,
            "seconds": round(r.seconds, 2),
            "kernels": sorted(r.seen),
            "worst_param": r.worst_param,
            "worst_err": r.worst_err,
            "tolerance": r.worst_tol,
            "min_cos": r.min_cos,
            "loss_err": r.loss_err,
            "reason": r.reason,
        }
        for r in results
    ]
    Path(path).write_text(json.dumps({"versions": _versions(device_type), "rows": out}, indent=1))


def _write_baseline(path: str, results, device_type: str, argv_text) -> None:
    """The classic rows' per-parameter errors: the noise of bf16 autocast with no fast path."""
    entry = {
        "measured": {
            "versions": _versions(device_type),
            "date": datetime.date.today().isoformat(),
            "command": "python -m megatron.validate " + " ".join(argv_text[1:]),
        }
    }
    for r in results:
        if r.row.name.endswith("/classic") and r.row.sp == 1 and r.status != "SKIP":
            entry[r.row.model] = {k: float(f"{v:.4g}") for k, v in r.errors.items()}
    data = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    data[device_type] = entry
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
