"""Attention core under sequence parallelism: Ulysses (ours, DeepSpeed's) vs ring vs 1 GPU.

Causal attention, forward + backward, batch 1, ``--heads`` x ``--head-dim`` (16 x 128),
bf16, every rank holding an ``s/p`` slice of the sequence. Methods, all in the same run:

* ``single``: PyTorch SDPA on the whole sequence on rank 0 alone (the ideal time at SP p
  is a p-th of it);
* ``ulysses-sdpa`` / ``ulysses-triton``: our :class:`DistributedAttention` (all-to-alls +
  local attention on ``[s, b, h/p, d]`` views of the receive buffer) around PyTorch SDPA
  (PyTorch picks the kernel: cuDNN on H100) or our Triton FlashAttention;
  ``ulysses-sdpa-sendorder``: the same
  from Q/K/V in the all-to-all's send order, as the model's projection writes them with
  learned positions (``DistributedAttention.attend_rank_major``: no packing copy; its
  gradient is the backward exchange's receive buffer);
* ``deepspeed``: ``deepspeed.sequence.layer.DistributedAttention`` around the same SDPA
  (three all-to-alls), when ``import deepspeed`` works;
* ``ring``: PyTorch's ring attention, ``torch.distributed.tensor.experimental.context_parallel``
  with SDPA on a 1-D mesh (causal load balancing as PyTorch sets it).

Each: median of ``--iters`` (>= 10) timed runs after ``--warmup``. ``--timing back-to-back``
(default): after one barrier the runs are launched one after another, as a training loop
does, and CUDA events around each give its GPU time; ``--timing synced``: a barrier and a
host sync before every run, which adds the CPU's time to launch the first kernels.
Reported: ms, % of ideal (single-GPU ms / p / ms), and per-GPU TFLOP/s
with the FlashAttention convention (causal fwd+bwd = 7 * b * s^2 * h * d FLOPs in total).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/bench_attention_core.py \\
        --seqlens 32768,131072,262144 --json results/attention_core.json
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/bench_attention_core.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    init_distributed,
    is_oom,
    log0,
    markdown_table,
    median,
    time_ms,
    write_json,
)

METHODS = (
    "single",
    "ulysses-sdpa",
    "ulysses-sdpa-blocks",
    "ulysses-sdpa-sendorder",
    "ulysses-triton",
    "deepspeed",
    "ring",
)
# Not run by default: where the time of ``ulysses-sdpa`` goes. ``local-contig``: each rank's
# SDPA alone on the whole sequence and its h/p heads, contiguous [b, h/p, s, d];
# ``local-ulysses``: the same on the layout the all-to-all hands over (views of one
# [s, b, 3h/p, d] receive buffer); ``a2a-only``: the all-to-alls around an identity.
DIAGNOSTICS = ("local-contig", "local-ulysses", "a2a-only")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", type=str, default="32768,131072,262144", help="comma list")
    p.add_argument("--sp", type=int, default=None, help="SP degree (default and only: world)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed runs (>= 10)")
    p.add_argument("--methods", type=str, default=",".join(METHODS), help="comma list")
    p.add_argument(
        "--sdpa-block-size", type=int, default=65536,
        help="ulysses-sdpa-blocks: the model's SDPA backend with this --sdpa-block-size "
        "(blockwise from two blocks per sequence; the same as ulysses-sdpa below that)",
    )  # fmt: skip
    p.add_argument("--json", type=str, default=None, help="write the results here")
    p.add_argument(
        "--trace-dir", type=str, default=None,
        help="also write a profiler trace (rank 0, 2 steps) of each method here",
    )  # fmt: skip
    p.add_argument(
        "--timing",
        choices=("back-to-back", "synced"),
        default="back-to-back",
        help="back-to-back: calls launched one after another as in training, CUDA events "
        "around each (default); synced: a barrier and host sync before every call",
    )
    p.add_argument(
        "--high-priority",
        action="store_true",
        help="run the all-to-alls on a high-priority NCCL stream (a new group)",
    )
    p.add_argument(
        "--cpu-smoke", action="store_true", help="gloo on CPU, tiny sizes (checks the code path)"
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        # Tiny, but keep the heads divisible by any SP degree up to 8.
        args.heads, args.head_dim, args.dtype = 8, 16, "fp32"
        if args.seqlens == p.get_default("seqlens"):
            args.seqlens = "128,256"
    args.seqlens = [int(s) for s in args.seqlens.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS) - set(DIAGNOSTICS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS + DIAGNOSTICS)}")
    if args.iters < 10:
        p.error("--iters must be >= 10")
    return args


def causal_attention_flops(b: int, s: int, h: int, d: int) -> float:
    """Forward (2 matmuls, half under the causal mask) + backward (2.5x forward)."""
    return 0.5 * 4 * b * s * s * h * d * 3.5


def sdpa_sbhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on [s, b, h, d] views (PyTorch picks the kernel); returns [s, b, h, d].

    The one-GPU reference and DeepSpeed's local attention. Ours runs the model's backend
    (``SDPAAttention``), which also hands cuDNN's backward a contiguous gradient."""
    out = F.scaled_dot_product_attention(
        q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), is_causal=True
    )
    return out.permute(2, 0, 1, 3)


def triton_sbhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from megatron.ops.flash_attn_triton import flash_attn_triton

    return flash_attn_triton(q, k, v, causal=True, layout="sbhd")


def _fused_qkv(s: int, args, device, dtype, seed: int) -> torch.Tensor:
    """[s, b, 3 * h * d] like the model's fused QKV projection output (a leaf with grad)."""
    g = torch.Generator(device=device).manual_seed(seed)
    width = 3 * args.heads * args.head_dim
    return torch.randn(
        s, args.batch, width, device=device, dtype=dtype, generator=g
    ).requires_grad_()


def _split(qkv: torch.Tensor, heads: int, head_dim: int) -> list[torch.Tensor]:
    s, b, _ = qkv.shape
    return [t.view(s, b, heads, head_dim) for t in qkv.split(heads * head_dim, dim=-1)]


def build_step(method: str, s: int, args, device, group) -> Callable[[], None]:
    """A fwd+bwd closure of ``method`` at sequence length ``s`` on this rank."""
    from megatron.core.sequence.layer import DistributedAttention
    from megatron.model.attention_backends import SDPAAttention

    dtype = DTYPES[args.dtype]
    p = dist.get_world_size(group)
    rank = dist.get_rank(group)
    local = s // p
    if method == "ring":
        return _ring_step(s, args, device, dtype, group)
    if method.startswith("local-"):
        return _local_step(method, s, args, device, dtype, p)
    if method == "ulysses-sdpa-sendorder":
        return _send_order_step(local, args, device, dtype, group)
    if method == "single":
        qkv = _fused_qkv(s, args, device, dtype, seed=0)
        fn, s_here = sdpa_sbhd, s
    else:
        qkv = _fused_qkv(local, args, device, dtype, seed=1 + rank)
        s_here = local
        if method == "deepspeed":
            fn = _deepspeed_attention(group)
        elif method == "a2a-only":
            fn = DistributedAttention(lambda q, k, v: q, group, scatter_idx=2, gather_idx=0)
        else:
            if method == "ulysses-triton":
                local_fn = triton_sbhd
            else:  # ours: the model's SDPA backend (blockwise only in "-blocks")
                block = args.sdpa_block_size if method == "ulysses-sdpa-blocks" else 0
                local_fn = SDPAAttention(0.0, args.head_dim**-0.5, block)
            fn = DistributedAttention(local_fn, group, scatter_idx=2, gather_idx=0)
    dout = torch.randn(s_here, args.batch, args.heads, args.head_dim, device=device, dtype=dtype)

    def step() -> None:
        qkv.grad = None
        q, k, v = _split(qkv, args.heads, args.head_dim)
        fn(q, k, v).backward(dout)

    return step


def _send_order_step(local: int, args, device, dtype, group) -> Callable[[], None]:
    """``ulysses-sdpa-sendorder``: Q/K/V ``[p, s/p, b, 3 h/p d]`` (rank r's heads in block r)."""
    from megatron.core.sequence.layer import DistributedAttention

    p = dist.get_world_size(group)
    width = args.heads // p * args.head_dim
    g = torch.Generator(device=device).manual_seed(1 + dist.get_rank(group))
    qkv_pnc = torch.randn(
        p, local, args.batch, 3 * width, device=device, dtype=dtype, generator=g
    ).requires_grad_()
    from megatron.model.attention_backends import SDPAAttention

    local_fn = SDPAAttention(0.0, args.head_dim**-0.5, 0)  # the model's SDPA backend
    attn = DistributedAttention(local_fn, group, scatter_idx=2, gather_idx=0)
    dout = torch.randn(local, args.batch, args.heads, args.head_dim, device=device, dtype=dtype)

    def step() -> None:
        qkv_pnc.grad = None
        attn.attend_rank_major(qkv_pnc, (width,) * 3, args.head_dim).backward(dout)

    return step


def _local_step(method: str, s: int, args, device, dtype, p: int) -> Callable[[], None]:
    """One rank's local attention alone: whole sequence, h/p heads (see DIAGNOSTICS)."""
    heads = args.heads // p
    g = torch.Generator(device=device).manual_seed(2)
    if method == "local-contig":
        shape = (args.batch, heads, s, args.head_dim)
        leaves = [torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(3)]
        for t in leaves:
            t.requires_grad_()
        dout = torch.randn(shape, device=device, dtype=dtype, generator=g)

        def step() -> None:
            for t in leaves:
                t.grad = None
            F.scaled_dot_product_attention(*leaves, is_causal=True).backward(dout)

        return step
    # [s, b, 3 * h/p, d]: Q, K, V heads side by side, as in the all-to-all's receive buffer
    buf = torch.randn(s, args.batch, 3 * heads, args.head_dim, device=device, dtype=dtype,
                      generator=g).requires_grad_()  # fmt: skip
    dout = torch.randn(s, args.batch, heads, args.head_dim, device=device, dtype=dtype)

    def step() -> None:
        buf.grad = None
        q, k, v = buf.split(heads, dim=2)
        sdpa_sbhd(q, k, v).backward(dout)

    return step


def _deepspeed_attention(group) -> Callable:
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention as DSDistributedAttention

    deepspeed.init_distributed()  # no-op when torch.distributed is already up
    attn = DSDistributedAttention(sdpa_sbhd, group, scatter_idx=2, gather_idx=0)
    if "batch_dim_idx" in inspect.signature(attn.forward).parameters:  # DeepSpeed >= 0.15
        return lambda q, k, v: attn(q, k, v, 1)  # [s, b, h, d]: batch is dim 1
    return attn


def _ring_step(s: int, args, device, dtype, group, backend=None) -> Callable[[], None]:
    """PyTorch ring attention: SDPA under ``context_parallel`` on [b, h, s, d] buffers
    (``backend``: an ``SDPBackend`` to force, else PyTorch's choice)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import sdpa_kernel

    mesh = init_device_mesh(device.type, (dist.get_world_size(group),))
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.heads, s, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(3))
    ctx = context_parallel(
        mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}
    )
    ctx.__enter__()  # shards q/k/v in place and patches SDPA until the runs are over
    for t in (q, k, v):
        t.requires_grad_()
    dout = torch.randn_like(q)

    def step() -> None:
        for t in (q, k, v):
            t.grad = None
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)

    step.close = lambda: ctx.__exit__(None, None, None)  # type: ignore[attr-defined]
    return step


def export_trace(step, device, path: str, steps: int = 2) -> None:
    """A profiler trace of ``steps`` runs of ``step``, written by rank 0 (gzipped JSON)."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(path)


def run_method(method: str, s: int, args, device, group) -> tuple[float, str]:
    """(median ms, note); every rank takes part (rank 0 alone computes for ``single``)."""
    note, ms, ok = "", float("nan"), True
    step = None
    b2b = args.timing == "back-to-back"
    try:
        step = (
            build_step(method, s, args, device, group)
            if method != "single" or dist.get_rank() == 0
            else None
        )
        if method == "ring":
            try:
                step()  # probe: context parallelism supports only some SDPA kernels
            except NotImplementedError:
                from torch.nn.attention import SDPBackend

                step.close()
                step = _ring_step(
                    s, args, device, DTYPES[args.dtype], group, SDPBackend.FLASH_ATTENTION
                )
                note = "SDPA flash kernel (context_parallel lacks the default one)"
        if method == "single":
            if step is not None:
                ms = median(
                    time_ms(step, device, args.warmup, args.iters, barrier=False, back_to_back=b2b)
                )
        else:
            ms = median(
                time_ms(step, device, args.warmup, args.iters, group=group, back_to_back=b2b)
            )
        if args.trace_dir and step is not None:
            export_trace(step, device, f"{args.trace_dir}/attn_{method}_{s}.json.gz")
    except Exception as err:  # noqa: BLE001 - reported as a skipped row, the run goes on
        ok = False
        kind = "out of memory" if is_oom(err) else f"{type(err).__name__}: {err}"
        note = "skipped: " + kind.splitlines()[0][:160]
    finally:
        if step is not None and hasattr(step, "close"):
            try:
                step.close()
            except Exception:  # noqa: BLE001
                pass
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # Agree on success (a rank that failed must not leave the others waiting later).
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item() > 0 and ok:
        note, ms = "skipped: failed on another rank", float("nan")
    result = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.broadcast(result, src=0, group=group)
    return float(result.item()), note


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.cpu_smoke)
    sp = args.sp or world
    if sp != world:
        raise SystemExit(f"error: --sp {sp} must equal the number of processes ({world})")
    if args.heads % sp:
        raise SystemExit(f"error: --heads {args.heads} is not divisible by the SP degree {sp}")
    group = dist.group.WORLD
    if args.high_priority and device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        group = dist.new_group(list(range(world)), pg_options=options)
    rows, records = [], []
    for s in args.seqlens:
        if s % sp:
            raise SystemExit(f"error: sequence length {s} is not divisible by SP {sp}")
        flops = causal_attention_flops(args.batch, s, args.heads, args.head_dim)
        single_ms = float("nan")
        for method in args.methods:
            ms, note = run_method(method, s, args, device, group)
            gpus = 1 if method == "single" else sp
            if method == "single":
                single_ms = ms
            ideal = single_ms / sp if method != "single" else float("nan")
            rec = {
                "method": method, "seqlen": s, "sp": gpus, "ms": ms,
                "pct_of_ideal": 100.0 * ideal / ms if ms == ms else float("nan"),
                "tflops_per_gpu": flops / (ms / 1000.0) / gpus / 1e12 if ms == ms else float("nan"),
                "note": note,
            }  # fmt: skip
            records.append(rec)
            rows.append([method, s, gpus, ms, rec["pct_of_ideal"], rec["tflops_per_gpu"], note])
            log0(f"  {method:15s} s={s:8d} {ms:10.2f} ms {note}")
    title = (
        f"Attention core fwd+bwd, causal, {args.dtype}, b={args.batch}, {args.heads} heads x "
        f"{args.head_dim}, SP {sp} ({device.type}); ideal = single-GPU ms / SP"
    )
    log0("\n" + title + "\n")
    log0(markdown_table(["method", "seq", "GPUs", "ms", "% of ideal", "TFLOP/s/GPU", "note"], rows))
    write_json(args.json, {"benchmark": "attention_core", "args": vars(args), "results": records})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
