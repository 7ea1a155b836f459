"""NCCL collective rates on one node, alone and beside matmuls (the attention's and ZeRO's).

For each per-rank buffer size (MiB; 96 and 32 are the Q/K/V and context all-to-alls of the
attention core at 32K tokens, SP 4, 16 heads x 128, bf16): the median time of an equal-block
all-to-all and its algorithm bandwidth (bytes each rank sends to others / time); then the
same collective on a side stream while the compute stream runs bf16 matmuls: how much of it
the matmuls hide. ``rs`` and ``ag`` time NCCL's fp32 reduce-scatter (that many MiB in per
rank) and bf16 all-gather (that many MiB out), ZeRO's gradient and weight collectives, the
same way. ``--carveouts`` repeats the runs beside matmuls with cuBLAS told to leave that many
SMs free (PyTorch's experimental SM carveout; it reaches cuBLASLt, ``--blas cublaslt``) so
that a persistent GEMM need not wait for the SMs the NCCL kernel holds.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/bench_all_to_all.py --json results/a2a.json

NCCL reads its environment once per process, so tuning variables (e.g. NCCL_MIN_NCHANNELS)
are compared by separate runs (``run_h100x4.sh a2a``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from common import init_distributed, log0, markdown_table, median, time_ms, write_json

NCCL_KNOBS = (
    "NCCL_MIN_NCHANNELS",
    "NCCL_MAX_NCHANNELS",
    "NCCL_MIN_P2P_NCHANNELS",
    "NCCL_MAX_P2P_NCHANNELS",
    "NCCL_NCHANNELS_PER_PEER",
    "NCCL_P2P_NVL_CHUNKSIZE",
    "NCCL_BUFFSIZE",
    "NCCL_PROTO",
    "NCCL_P2P_LEVEL",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mib", default="32,96", help="per-rank buffer sizes, comma list")
    p.add_argument(
        "--impls",
        default="nccl,rs,ag",
        help="nccl (all-to-all), rs (fp32 reduce-scatter), ag (bf16 all-gather); comma list",
    )
    p.add_argument(
        "--matmul", default="8192,8192,8192", help="m,k,n of the bf16 matmuls beside the exchange"
    )
    p.add_argument("--matmuls", type=int, default=2, help="matmuls per exchange")
    p.add_argument("--carveouts", default="0", help="SMs left to NCCL by the matmuls, comma list")
    p.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-overlap", action="store_true", help="skip the under-compute runs")
    p.add_argument("--label", default=None, help="name of this run's NCCL settings")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.sizes_mib = [float(s) for s in args.sizes_mib.split(",") if s]
    args.impls = [s for s in args.impls.split(",") if s]
    args.matmul = [int(x) for x in args.matmul.split(",")]
    args.carveouts = [int(x) for x in args.carveouts.split(",") if x]
    if not set(args.impls) <= {"nccl", "rs", "ag"}:
        p.error(f"--impls takes nccl, rs, ag; got {args.impls}")
    if len(args.matmul) != 3 or args.matmuls < 1 or min(args.carveouts + args.matmul) < 0:
        p.error("--matmul takes m,k,n; --matmuls >= 1; --carveouts >= 0")
    return args


def make_exchange(impl: str, send_src: torch.Tensor, group) -> Callable[[], object]:
    """A no-argument callable that runs one ``impl`` collective of ``send_src`` ([p, n])."""
    if impl == "nccl":
        recv = torch.empty_like(send_src)
        return lambda: dist.all_to_all_single(recv, send_src, group=group)
    if impl == "rs":  # the same bytes per rank in fp32, one block of the sum back
        grads = send_src[:, : send_src.shape[1] // 2].float()  # as many bytes
        out = grads.new_empty(grads.shape[1:])
        return lambda: dist.reduce_scatter_tensor(out, grads, group=group)
    if impl == "ag":  # one block of bf16 weights in, every rank's back
        gathered = torch.empty_like(send_src)
        return lambda: dist.all_gather_into_tensor(gathered, send_src[0], group=group)
    raise ValueError(f"unknown impl {impl!r} (nccl, rs, ag)")


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed(False)
    group = dist.group.WORLD
    label = args.label or ",".join(f"{k}={os.environ[k]}" for k in NCCL_KNOBS if k in os.environ)
    label = label or "defaults"
    rows, results = [], []
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    m, k, n_cols = args.matmul
    mm_a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    mm_b = torch.randn(k, n_cols, device=device, dtype=torch.bfloat16)

    def compute(carveout: int) -> None:
        """The matmuls, cuBLAS told to leave ``carveout`` SMs free (0: no limit)."""
        torch._C._set_sm_carveout_experimental(carveout or None)
        for _ in range(args.matmuls):
            torch.mm(mm_a, mm_b)
        torch._C._set_sm_carveout_experimental(None)

    compute_alone = {
        cv: median(time_ms(lambda cv=cv: compute(cv), device, 3, args.iters))
        for cv in args.carveouts
    }
    side = torch.cuda.Stream()
    for size in args.sizes_mib:
        n = int(size * 2**20) // 2 // world  # bf16 elements per block
        g = torch.Generator(device=device).manual_seed(rank)
        src = torch.randn(world, n, device=device, dtype=torch.bfloat16, generator=g)
        for impl in args.impls:
            run = make_exchange(impl, src, group)
            ms = median(time_ms(run, device, args.warmup, args.iters))
            sent = n * 2 * (world - 1)
            row = {
                "impl": impl,
                "mib_per_rank": size,
                "ms": ms,
                "algbw_gbs": sent / ms / 1e6,
            }
            if args.no_overlap:
                results.append(row)
                rows.append([impl, size, ms, row["algbw_gbs"], "-", "-", "-", "-"])
                continue

            for cv in args.carveouts:

                def both(run=run, cv=cv):
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        run()
                    compute(cv)
                    torch.cuda.current_stream().wait_stream(side)

                alone = compute_alone[cv]
                both_ms = median(time_ms(both, device, args.warmup, args.iters))
                results.append(
                    row | {"carveout": cv, "compute_alone_ms": alone, "both_ms": both_ms}
                )
                hidden = ms + alone - both_ms  # of the exchange's time, what the overlap saved
                rows.append([impl, size, ms, row["algbw_gbs"], cv, alone, both_ms, hidden])
    log0(
        f"\nNCCL collectives, {world} ranks, NCCL settings: {label}; beside {args.matmuls} x {m}x{k}x{n_cols} bf16 matmuls, BLAS {args.blas}"
    )
    log0(
        markdown_table(
            [
                "impl",
                "MiB/rank",
                "ms",
                "GB/s/rank",
                "SM carveout",
                "matmuls alone ms",
                "both ms",
                "hidden ms",
            ],
            rows,
        )
    )
    write_json(
        args.json, {"label": label, "blas": args.blas, "matmul": args.matmul, "results": results}
    )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
