"""The longest sequence the 1.3B model trains on: one fresh torchrun attempt per length.

For each ``--seqlens`` entry (ascending) this driver launches ``bench_end_to_end.py`` under
``torchrun --standalone`` (RoPE, full recompute, ZeRO 3, chunked loss by default; extra
flags after ``--`` go to it) with ``--warmup`` + ``--iters`` iterations, and records
whether it ran, ran out of memory, failed or timed out, with its MFU and peak memory next
to ``megatron.planning.memory_model``'s prediction. Attempts run in separate processes so an
out-of-memory rank cannot wedge the next attempt.

Time budget: after the first success the time of each further attempt is predicted from
the measured iteration time scaled by the model FLOPs; an attempt predicted to exceed
``--attempt-timeout-s`` runs without warm-up, and one still too long (or beyond what is left
of ``--budget-s``) is skipped and reported as such.

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_max_seqlen.py --nproc 4 \\
        --seqlens 262144,524288,786432,1048576 --json results/max_seqlen.json
    OMP_NUM_THREADS=1 python benchmarks/bench_max_seqlen.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from common import add_model_shape_args, markdown_table  # noqa: E402

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="GPUs (default: all visible)")
    p.add_argument("--seqlens", type=str, default="262144,524288,786432,1048576")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=520.0, help="wall time for all attempts")
    p.add_argument("--attempt-timeout-s", type=float, default=230.0, help="per attempt")
    p.add_argument("--json", type=str, default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="2 gloo ranks, tiny model")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args, unknown = p.parse_known_args(argv)
    extra = unknown + extra  # anything else is for bench_end_to_end.py
    if args.cpu_smoke:
        args.nproc = args.nproc or 2
        if args.seqlens == p.get_default("seqlens"):
            args.seqlens = "256,512,1024"
    if args.nproc is None:
        import torch

        args.nproc = max(1, torch.cuda.device_count())
    args.seqlens = sorted(int(s) for s in args.seqlens.split(",") if s)
    return args, extra


def e2e_command(args, seq: int, warmup: int, out_json: Path, extra: list[str]) -> list[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={args.nproc}", str(HERE / "bench_end_to_end.py"),
        "--seq-length", str(seq), "--recompute", "full", "--zero-stage", "3",
        "--position-embedding-type", "rope", "--warmup", str(warmup), "--iters", str(args.iters),
        "--timeout-minutes", "3", "--json", str(out_json),
    ]  # fmt: skip
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    return cmd + extra


def run_attempt(cmd: list[str], timeout_s: float, log_path: Path) -> tuple[str, float]:
    """Run one attempt in its own process group; (status, wall seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return "timeout", time.monotonic() - start
    text = log_path.read_text(encoding="utf-8", errors="replace").lower()
    if rc != 0:
        return (
            "oom" if "out of memory" in text else f"error (exit {rc})"
        ), time.monotonic() - start
    return "ok", time.monotonic() - start


def flops_per_iter(seq: int, extra: list[str]) -> float:
    """Model FLOPs of one iteration at ``seq`` (the time predictor's yardstick)."""
    from megatron.model import ModelConfig, model_flops_per_token

    shape = argparse.ArgumentParser(add_help=False)
    add_model_shape_args(shape)
    a = shape.parse_known_args(extra)[0]
    cfg = ModelConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads, padded_vocab_size=a.vocab_size + 1,
        seq_length=seq, position_embedding_type="rope",
    )  # fmt: skip
    return model_flops_per_token(cfg, seq) * seq


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    rows, records = [], []
    ref = None  # (flops, seconds per iteration, start-up seconds) of the last success
    with tempfile.TemporaryDirectory(prefix="max_seqlen_") as tmp:
        for seq in args.seqlens:
            warmup, note = args.warmup, ""
            left = deadline - time.monotonic()
            if ref is not None:
                per_iter = ref[1] * flops_per_iter(seq, extra) / ref[0]
                predicted = ref[2] + (warmup + args.iters) * per_iter
                if predicted > min(args.attempt_timeout_s, left) and warmup > 0:
                    warmup, note = 0, "no warm-up (time)"
                    predicted = ref[2] + args.iters * per_iter
                if predicted > min(args.attempt_timeout_s, left):
                    rec = {
                        "seq_length": seq,
                        "status": "skipped",
                        "note": f"predicted {predicted:.0f} s",
                    }
                    records.append(rec)
                    rows.append([seq, "skipped", "-", "-", "-", "-", "-", "-", rec["note"]])
                    print(f"> seq {seq}: skipped, predicted {predicted:.0f} s", flush=True)
                    continue
            out_json = Path(tmp) / f"seq_{seq}.json"
            log_path = Path(tmp) / f"seq_{seq}.log"
            print(f"> seq {seq}: launching ({warmup} warm-up + {args.iters} timed)", flush=True)
            status, wall = run_attempt(
                e2e_command(args, seq, warmup, out_json, extra),
                min(args.attempt_timeout_s, max(left, 1.0)), log_path,
            )  # fmt: skip
            result = {}
            if out_json.exists():
                data = json.loads(out_json.read_text())
                status = "oom" if data["status"] == "oom" else status
                result = data["results"][0] if data["results"] else {}
            if status not in ("ok", "oom"):
                tail = [
                    ln
                    for ln in log_path.read_text(errors="replace").splitlines()
                    if "Warning" not in ln
                ][-25:]
                print("\n".join("    " + line for line in tail), flush=True)
            rec = {"seq_length": seq, "status": status, "attempt_s": wall, "warmup": warmup,
                   "note": note, **result}  # fmt: skip
            records.append(rec)
            if status == "ok" and result:
                per_iter = result["ms_per_iter"] / 1000.0
                ref = (
                    flops_per_iter(seq, extra),
                    per_iter,
                    max(0.0, wall - (warmup + args.iters) * per_iter),
                )
            rows.append([
                seq, status, result.get("ms_per_iter", float("nan")),
                100.0 * result.get("mfu", float("nan")), result.get("tflops_per_gpu", float("nan")),
                result.get("peak_mem_gib", float("nan")), result.get("predicted_mem_gib", float("nan")),
                wall, note,
            ])  # fmt: skip
            print(f"> seq {seq}: {status} in {wall:.0f} s", flush=True)
    ran = [r for r in records if r["status"] == "ok"]
    print(
        f"\nMax sequence length: 1.3B-style GPT, RoPE, full recompute, ZeRO 3, {args.nproc} ranks\n"
    )
    headers = ["seq", "status", "ms/iter", "MFU %", "TFLOP/s/GPU", "peak GiB", "predicted GiB",
               "attempt s", "note"]  # fmt: skip
    print(markdown_table(headers, rows))
    if ran:
        best = max(ran, key=lambda r: r["seq_length"])
        print(f"\nlargest that ran: {best['seq_length']} tokens, MFU {100 * best['mfu']:.1f} %, "
              f"peak {best['peak_mem_gib']:.2f} GiB (predicted {best['predicted_mem_gib']:.2f})")  # fmt: skip
    else:
        print("\nno sequence length ran")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"benchmark": "max_seqlen", "args": vars(args), "extra_args": extra,
                       "attempts": records}, f, indent=2, default=str)  # fmt: skip
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
