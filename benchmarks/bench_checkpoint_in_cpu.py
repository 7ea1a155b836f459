"""The stall of ``--checkpoint-in-cpu``: iteration time with it minus without, one GPU.

Three runs of ``bench_end_to_end.py``'s configuration in one process, at a length where
all fit (full recompute in every one): without the flag; with it as implemented
(``megatron.model.activation_offload``: copies on side streams, the next group's input
fetched ahead); and with the earlier scheme (``--before``, on by default: each copy on the
compute stream, each input fetched when its recomputation asks for it), re-created here
for the comparison. Reports ms/iteration, the stall of each scheme and the peak GPU
memory; ``--json`` writes them. Extra flags go to ``bench_end_to_end.py``'s parser.

    python benchmarks/bench_checkpoint_in_cpu.py --seq-length 65536 --json stall.json
    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint_in_cpu.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_end_to_end import free_memory, run_config
from bench_end_to_end import parse_args as parse_e2e
from common import init_distributed, log0, markdown_table, write_json

import megatron.model.transformer as transformer


class _BeforeOffload:
    """The earlier scheme: copies on the compute stream, inputs fetched on demand."""

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-before", action="store_true", help="skip the earlier scheme's run")
    p.add_argument("--json", type=str, default=None)
    own, rest = p.parse_known_args(argv)
    args = parse_e2e([*rest, "--recompute", "full"])
    _, world, device = init_distributed(args.cpu_smoke, args.timeout_minutes)
    sp = args.sp or world
    runs = [("without --checkpoint-in-cpu", False, None), ("side streams + prefetch", True, None)]
    if not own.no_before:
        runs.append(("before: compute stream, on demand", True, _BeforeOffload))
    results = []
    current = transformer.HostOffload
    for name, flag, scheme in runs:
        variant = argparse.Namespace(**vars(args))
        variant.checkpoint_in_cpu = flag
        transformer.HostOffload = scheme or current
        try:
            r = run_config(variant, args.seq_length, sp, world, device)
        finally:
            transformer.HostOffload = current
        free_memory(device)
        results.append({"scheme": name, **r})
    base = results[0]["ms_per_iter"]
    rows = [
        [r["scheme"], r["ms_per_iter"], r["ms_per_iter"] - base, r["peak_mem_gib"]] for r in results
    ]
    log0(
        f"\n--checkpoint-in-cpu stall, seq {args.seq_length}, {args.num_layers} layers x "
        f"{args.hidden_size}, {world} {'CPU ranks' if args.cpu_smoke else 'GPUs'}\n\n"
        + markdown_table(["scheme", "ms/iter", "stall ms", "peak GPU GiB"], rows)
    )
    write_json(own.json, {"benchmark": "checkpoint_in_cpu_stall", "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
