"""Ring attention's compute overhead on one GPU: every ring rank's steps, one after another.

For each ring degree R and sequence length s (causal, batch 1, ``--heads`` x ``--head-dim``,
bf16), the sequence is put in ring attention's load-balanced order (``2R`` chunks, rank i
holds chunks i and 2R-1-i) and, for every ring rank in turn, the steps that rank runs are
run here: R forward calls of the SDPA backend's attention step (cuDNN) merged by
log-sum-exp, then R backward calls from the merged output and log-sum-exp, dQ summed over
the steps and dK/dV accumulated per block in fp32 (what travels with the K/V in the real
ring). No communication: the total is the compute of an R-rank ring run by one GPU. It is
compared with the default one-GPU path on the whole sequence, the sdpa backend with the
default ``--sdpa-block-size`` (one causal cuDNN call below 128K tokens, 64K-token blocks merged
by log-sum-exp from 128K), forward + backward, and with one causal SDPA call
(``F.scaled_dot_product_attention``). Overhead = ring total / default path - 1 (and against
the one call); the target at 128K is under 5 %. ``max_rel_diff``: the largest
difference of the outputs and of dQ, dK, dV between the two, relative to the largest value.

    python benchmarks/bench_ring_one_gpu.py --out results/ring_one_gpu.json
    python benchmarks/bench_ring_one_gpu.py --cpu-smoke --out /tmp/ring.json
    python benchmarks/bench_ring_one_gpu.py --seqlens 131072 --rings 8 --profile   # where it goes

``--out FILE`` writes the JSON there and the markdown table to FILE with ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, median, time_ms, write_json  # noqa: E402

from megatron.core.sequence.ring import load_balanced_order, step_rows  # noqa: E402
from megatron.model.attention_backends import SDPAAttention  # noqa: E402
from megatron.model.attention_step import SDPA_STEP, merge_  # noqa: E402
from megatron.model.impl_config import ImplConfig  # noqa: E402
from megatron.ops import contiguous_grad  # noqa: E402


def ring_ranks_one_gpu(q, k, v, dout, cp: int, scale: float) -> tuple[torch.Tensor, ...]:
    """Every ring rank's forward and backward steps in turn; ``q, k, v, dout`` ``[s, b, h, d]``
    in load-balanced order. Returns (out, dq, dk, dv) in that order."""
    s = q.shape[0]
    n, c = s // cp, s // (2 * cp)
    outs, dqs = [], []
    dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
    kv = torch.stack((k, v))
    for i in range(cp):
        q_i, do_i = q[i * n : (i + 1) * n], dout[i * n : (i + 1) * n]
        out = lse = None
        for t in range(cp):
            j = (i - t) % cp
            qs, ks, causal = step_rows(i, j, c)
            kv_j = kv[:, j * n : (j + 1) * n]
            o_sbhd, l_bhs = SDPA_STEP(
                q_i[qs], kv_j[0, ks], kv_j[1, ks], causal=causal, softmax_scale=scale
            )
            if out is None:
                out, lse = o_sbhd.to(l_bhs.dtype), l_bhs
            else:
                merge_(out[qs], lse[..., qs], o_sbhd, l_bhs)  # in place
        out = out.to(q.dtype)
        dq = torch.zeros_like(q_i, dtype=torch.float32)
        for t in range(cp):
            j = (i - t) % cp
            qs, ks, causal = step_rows(i, j, c)
            kv_j = kv[:, j * n : (j + 1) * n]
            dq_p, dk_p, dv_p = SDPA_STEP.backward(
                do_i[qs], q_i[qs], kv_j[0, ks], kv_j[1, ks], out[qs], lse[..., qs].contiguous(),
                causal=causal, softmax_scale=scale,
            )  # fmt: skip
            dq[qs] += dq_p
            dkv[0, j * n : (j + 1) * n][ks] += dk_p
            dkv[1, j * n : (j + 1) * n][ks] += dv_p
        outs.append(out)
        dqs.append(dq.to(q.dtype))
    return torch.cat(outs), torch.cat(dqs), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def forward_backward(attn, q, k, v, dout) -> tuple[torch.Tensor, ...]:
    """``attn(q, k, v)`` on ``[s, b, h, d]`` forward and backward from ``dout``; returns
    (out, dq, dk, dv)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attn(*leaves)
    out.backward(dout)
    return (out.detach(), *(t.grad for t in leaves))


def single_call(q, k, v, dout, scale: float) -> tuple[torch.Tensor, ...]:
    """One causal SDPA call (cuDNN) on the whole sequence, forward + backward."""

    def attn(q_sbhd, k_sbhd, v_sbhd):
        bhsd = (t.permute(1, 2, 0, 3) for t in (q_sbhd, k_sbhd, v_sbhd))
        out = F.scaled_dot_product_attention(*bhsd, is_causal=True, scale=scale)
        return contiguous_grad(out).permute(2, 0, 1, 3)  # cuDNN's gradient-layout bug

    return forward_backward(attn, q, k, v, dout)


def default_path(q, k, v, dout, scale: float) -> tuple[torch.Tensor, ...]:
    """The project's default one-GPU path for this causal attention: the ``sdpa`` backend
    (``--use-flash-attn``) with the default ``--sdpa-block-size`` (64K blocks from 128K
    tokens, else one call), forward + backward."""
    attn = SDPAAttention(0.0, scale, ImplConfig.sdpa_block_size)
    return forward_backward(attn, q, k, v, dout)


def top_kernels(fn, device: torch.device, n: int = 12) -> list[dict]:
    """One profiled call of ``fn``: the ``n`` names with the most self time on the device
    (on CPU, CPU time), with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = [(getattr(e, key), e.key, e.count) for e in prof.key_averages() if getattr(e, key) > 0]
    return [{"name": name[:90], "ms": us / 1000.0, "calls": calls}
            for us, name, calls in sorted(rows, reverse=True)[:n]]  # fmt: skip


def _measure(s: int, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One sequence length: the single call, then each ring degree."""
    scale = args.head_dim**-0.5
    g = torch.Generator(device=device).manual_seed(s)
    q, k, v, dout = (
        torch.randn(s, 1, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
        for _ in range(4)
    )
    ref = single_call(q, k, v, dout, scale)
    single = median(time_ms(functools.partial(single_call, q, k, v, dout, scale), device,
                            args.warmup, args.iters, barrier=False))  # fmt: skip
    default = median(time_ms(functools.partial(default_path, q, k, v, dout, scale), device,
                             args.warmup, args.iters, barrier=False))  # fmt: skip
    out = []
    for cp in map(int, args.rings.split(",")):
        order = load_balanced_order(s, cp).to(device)
        ring_args = (*(t[order] for t in (q, k, v, dout)), cp, scale)
        got = ring_ranks_one_gpu(*ring_args)
        # largest difference of out, dq, dk, dv, relative to the largest reference value
        err = max(
            ((a.float() - b[order].float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip(got, ref)
        )
        ring = median(time_ms(functools.partial(ring_ranks_one_gpu, *ring_args), device,
                              args.warmup, args.iters, barrier=False))  # fmt: skip
        out.append({"seq": s, "ring": cp, "single_ms": single, "default_ms": default,
                    "ring_ms": ring, "overhead": ring / default - 1.0,
                    "overhead_vs_single": ring / single - 1.0, "max_rel_diff": err})  # fmt: skip
        print(f"s={s} R={cp}: single {single:.1f} ms, default path {default:.1f} ms, ring "
              f"ranks {ring:.1f} ms ({100 * (ring / default - 1):+.1f}% of the default path, "
              f"{100 * (ring / single - 1):+.1f}% of one call), max relative diff {err:.2g}",
              flush=True)  # fmt: skip
        if args.profile:  # where the ring's extra time goes, next to the single call's kernels
            out[-1]["profile_ring"] = top_kernels(
                functools.partial(ring_ranks_one_gpu, *ring_args), device
            )
            out[-1]["profile_single"] = top_kernels(
                functools.partial(single_call, q, k, v, dout, scale), device
            )
            for what in ("profile_single", "profile_ring"):
                print(f"  {what} (self time, ms, calls):")
                for e in out[-1][what]:
                    print(f"    {e['ms']:9.2f} {e['calls']:5d}  {e['name']}")
        del ring_args, got
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", default="32768,131072,262144")
    p.add_argument("--rings", default="2,4,8")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON here, markdown beside it (.md)")
    p.add_argument(
        "--profile", action="store_true", help="also the top kernels of one call of each (JSON)"
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny float32 shapes on CPU")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.seqlens, args.rings, args.heads, args.head_dim = "64", "2,4", 2, 16
        args.warmup, args.iters = 0, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU is visible; use --cpu-smoke on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows, results = [], []
    for s in map(int, args.seqlens.split(",")):
        for r in _measure(s, args, device, dtype):
            results.append(r)
            rows.append([r["seq"], r["ring"], r["single_ms"], r["default_ms"], r["ring_ms"],
                         f"{100 * r['overhead']:+.1f}%", f"{100 * r['overhead_vs_single']:+.1f}%",
                         f"{r['max_rel_diff']:.2g}"])  # fmt: skip
    table = markdown_table(
        ["seq", "R", "one SDPA call ms", "default path ms", "R ring ranks ms",
         "overhead (default path)", "overhead (one call)", "max rel diff"], rows,
    )  # fmt: skip
    print(table)
    payload = {
        "what": "one GPU runs every ring rank's load-balanced steps vs the default path and one "
        "causal SDPA call",
        "heads": args.heads, "head_dim": args.head_dim, "dtype": str(dtype),
        "results": results,
    }  # fmt: skip
    if args.out:
        write_json(args.out, payload)
        Path(args.out).with_suffix(".md").write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
