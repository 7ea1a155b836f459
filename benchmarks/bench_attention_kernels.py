"""One GPU: the attention kernel table, causal and packed documents, forward + backward.

Methods (each where it takes the mask; a failure is recorded, not fatal):
``triton`` (ours, megatron.ops.flash_attn_triton), ``triton-fused-dq`` (ours with dQ in the
dK/dV kernel), ``cudnn`` and ``flash`` (PyTorch SDPA with that backend forced; causal only),
``varlen`` (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10), ``flex`` (compiled
FlexAttention with ``create_block_mask(..., _compile=True)``), ``doc-loop`` (SDPA per document
on its slice; documents only), ``sdpa-dense`` (SDPA with the dense [b, 1, s, s] mask, what the
sdpa backend did; documents only, off by default).

Cases: ``--cases`` of SEQ:HEADS (default 32K with 16 heads and 128K with 4), head size 128,
bf16, batch 1, each causal and with packed documents (lengths uniform in [2K, 8K], seeded;
the last one cut at the sequence end). Whatever a method builds from the doc ids (bounds,
cumulative lengths, block mask) is inside the timed call. FLOPs: 4 x d x h x (visible
query-key pairs) per forward, the pairs s^2/2 for causal and sum(L_i^2/2) over documents;
fwd+bwd = 3.5 x forward (FlashAttention's convention). Time: median of --iters CUDA-event
timed calls after 3 warm-ups; memory: peak allocated during one call minus before it.
Triton autotuning is off (each shape runs its default configuration) so the whole table
takes a few minutes.

    python benchmarks/bench_attention_kernels.py --out kernels.json
    python benchmarks/bench_attention_kernels.py --cpu-smoke --out /tmp/k.json   # code path
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("triton", "triton-fused-dq", "cudnn", "flash", "varlen", "flex", "doc-loop")
ALL_METHODS = (*METHODS, "sdpa-dense")
CAUSAL_ONLY = ("cudnn", "flash")
DOCS_ONLY = ("doc-loop", "sdpa-dense")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=["32768:16", "131072:4"], help="SEQ:HEADS")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=ALL_METHODS)
    p.add_argument("--masks", nargs="+", default=["causal", "documents"])
    p.add_argument("--doc-min", type=int, default=2048)
    p.add_argument("--doc-max", type=int, default=8192)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write JSON (or markdown: *.md) here")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: the code path")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.cases, args.head_dim, args.doc_min, args.doc_max, args.iters = (
            ["64:2"], 64, 16, 32, 1,
        )  # fmt: skip
    return args


def doc_lengths(s: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < s:
        n = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), s - total)
        lengths.append(n)
        total += n
    return lengths


def make_fn(method: str, mask: str, doc_ids, scale: float):
    """fn(q, k, v) -> out on [s, b, h, d] tensors, or None where the method skips the mask."""
    if (mask == "causal" and method in DOCS_ONLY) or (mask != "causal" and method in CAUSAL_ONLY):
        return None
    docs = doc_ids if mask != "causal" else None
    if method.startswith("triton"):
        import megatron.ops.flash_attn_triton as fa

        def triton_fn(q, k, v):
            fa.FUSED_DQ = method == "triton-fused-dq"
            return fa.flash_attn_triton(q, k, v, causal=True, softmax_scale=scale, doc_ids=docs)

        return triton_fn
    if method in ("cudnn", "flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from megatron.ops import contiguous_grad

        backend = SDPBackend.CUDNN_ATTENTION if method == "cudnn" else SDPBackend.FLASH_ATTENTION

        def sdpa_fn(q, k, v):
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(
                    *(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, scale=scale
                )
            return contiguous_grad(o).permute(2, 0, 1, 3)  # as the sdpa backend (cuDNN's bug)

        return sdpa_fn
    if method == "varlen":
        from megatron.ops.packed_attention import varlen_attention

        ids = docs if docs is not None else torch.zeros_like(doc_ids)
        return lambda q, k, v: varlen_attention(q, k, v, ids, softmax_scale=scale)
    if method == "doc-loop":
        from megatron.ops.packed_attention import document_loop_attention

        return lambda q, k, v: document_loop_attention(q, k, v, docs, softmax_scale=scale)
    if method == "sdpa-dense":
        from megatron.model.attention_backends import causal_doc_mask

        def dense_fn(q, k, v):
            m = causal_doc_mask(q.shape[0], docs, q.device)
            o = F.scaled_dot_product_attention(
                *(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=m, scale=scale
            )
            return o.permute(2, 0, 1, 3)

        return dense_fn
    if method == "flex":
        return _flex_fn(docs, scale)
    raise ValueError(method)


_FLEX = {}


def _flex_fn(docs, scale: float):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "attn" not in _FLEX:
        _FLEX["attn"] = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        s = q.shape[0]
        if docs is None:

            def mask_mod(b, h, qi, ki):
                return qi >= ki
        else:
            row = docs[0]

            def mask_mod(b, h, qi, ki):
                return (qi >= ki) & (row[qi] == row[ki])

        block_mask = create_block_mask(mask_mod, None, None, s, s, device=q.device, _compile=True)
        o = _FLEX["attn"](*(t.permute(1, 2, 0, 3) for t in (q, k, v)), block_mask=block_mask,
                          scale=scale)  # fmt: skip
        return o.permute(2, 0, 1, 3)

    return fn


def bench(fn, q, k, v, dout, iters: int, cuda: bool) -> tuple[float, float]:
    """(median ms of forward + backward, peak extra GiB of one call)."""

    def call():
        o = fn(q, k, v)
        torch.autograd.grad(o, (q, k, v), dout)

    for _ in range(3 if cuda else 0):
        call()
    extra = float("nan")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), extra


def run_case(args, s: int, h: int, mask: str, device, dtype) -> list[dict]:
    d, b = args.head_dim, 1
    g = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v, dout = (torch.randn(s, b, h, d, generator=g, device=device, dtype=dtype)
                     for _ in range(4))  # fmt: skip
    for t in (q, k, v):
        t.requires_grad_()
    lengths = doc_lengths(s, args.doc_min, args.doc_max, args.seed) if mask != "causal" else [s]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    doc_ids = doc_ids.to(device, torch.int32)[None].expand(b, s).contiguous()
    pairs = sum(n * n / 2 for n in lengths)
    flops = 4 * d * h * b * pairs * 3.5
    scale = 1 / math.sqrt(d)
    rows, ref = [], None
    for method in args.methods:
        row = {"seq": s, "heads": h, "mask": mask, "method": method, "documents": len(lengths)}
        fn = make_fn(method, mask, doc_ids, scale)
        if fn is None:
            continue
        try:
            with torch.no_grad():
                out = fn(q, k, v).float()
            if ref is None:
                ref = out
            row["err_vs_first"] = ((out - ref).norm() / ref.norm()).item()
            del out
            ms, extra = bench(fn, q, k, v, dout, args.iters, device.type == "cuda")
            row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12, extra_gib=extra)
        except Exception as e:  # a method may not take the case: recorded
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        print(_line(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _line(r: dict) -> str:
    seq = f"{r['seq'] // 1024}K" if r["seq"] >= 1024 else str(r["seq"])
    head = f"| {seq} | {r['heads']} | {r['mask']} | {r['method']} |"
    if "error" in r:
        return f"{head} error: {r['error'][:80]} | | | |"
    return (
        f"{head} {r['ms']:.2f} | {r['tflops']:.0f} | {r['extra_gib']:.2f} "
        f"| {r['err_vs_first']:.1e} |"
    )


HEADER = (
    "| seq | heads | mask | method | fwd+bwd ms | TFLOP/s | peak extra GiB | out vs first |\n"
    "|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("error: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:  # the Triton interpreter; flex and the forced SDPA kernels need CUDA
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.methods = [m for m in args.methods if m in ("triton", "triton-fused-dq", "doc-loop")]
    from megatron.ops.flash_attn_triton_fwd import set_autotune

    set_autotune(False)
    env = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
    }
    print(f"{env}\n{HEADER}", flush=True)
    rows = []
    for case in args.cases:
        s, h = (int(x) for x in case.split(":"))
        for mask in args.masks:
            rows += run_case(args, s, h, mask, device, dtype)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.out.suffix == ".md":
            args.out.write_text(f"{env}\n\n{HEADER}\n" + "\n".join(map(_line, rows)) + "\n")
        else:
            meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
            args.out.write_text(json.dumps({"env": env, "config": meta, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
