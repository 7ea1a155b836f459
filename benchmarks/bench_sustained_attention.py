"""cuDNN attention forward + backward on one GPU, back to back for a while: the time per call
against the elapsed time, which shows the GPU settling at its power limit (clocks: run
``nvidia-smi dmon -s pc`` beside it).

    python benchmarks/bench_sustained_attention.py --seconds 25
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--heads", type=int, default=4, help="one SP 4 rank's share of 16")
    p.add_argument("--calls", type=int, default=20, help="calls per timed sample")
    args = p.parse_args()
    shape = (args.seq_length, 1, args.heads, 128)  # [s, b, h, d], viewed as [b, h, s, d]
    q, k, v = (
        torch.randn(shape, device="cuda", dtype=torch.bfloat16).permute(1, 2, 0, 3).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(1, args.heads, args.seq_length, 128, device="cuda", dtype=torch.bfloat16)
    samples, start = [], time.time()
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        while time.time() - start < args.seconds:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(args.calls):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
            end.record()
            end.synchronize()
            samples.append((time.time() - start, begin.elapsed_time(end) / args.calls))
    step = max(1, len(samples) // 15)
    for elapsed, ms in samples[1::step] + samples[-1:]:  # the first sample includes set-up
        print(f"t = {elapsed:5.1f} s: forward + backward {ms:.3f} ms")


if __name__ == "__main__":
    main()
