"""The bias-GeLU kernels against PyTorch's unfused ops on one GPU, under a few tilings.

Unfused is what the MLP runs with ``--no-bias-gelu-fusion``: forward ``F.gelu`` of the
product (the bias added in the GEMM's epilogue); backward GeLU's gradient plus the bias
gradient's column sum. Fused: :mod:`megatron.ops.bias_gelu_triton`. Prints one table (median
of ``--iters`` back-to-back calls, with effective memory bandwidth) and writes JSON.

    python benchmarks/bench_bias_gelu.py --rows 8192 --features 8192
"""

from __future__ import annotations

import argparse
import itertools
import types

import torch
import torch.nn.functional as F
from common import log0, markdown_table, median, time_ms, write_json

from megatron.ops import bias_gelu_triton as bg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192, help="tokens (1.3B at 32K, SP 4: 8192)")
    p.add_argument("--features", type=int, default=8192, help="FFN width (1.3B: 8192)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible; this benchmark times CUDA kernels")
    dev = torch.device("cuda")
    n, f = args.rows, args.features
    x = torch.randn(n, f, device=dev).bfloat16()
    bias = 0.1 * torch.randn(f, device=dev)
    dy = torch.randn(n, f, device=dev).bfloat16()
    xb = x + bias.bfloat16()
    mib = n * f * 2 / 2**20  # one [n, f] bf16 tensor

    def unfused_fwd():
        return F.gelu(xb)

    def unfused_bwd():
        dx = torch.ops.aten.gelu_backward(dy, xb)
        return dx, dx.sum(0)

    rows = []

    def add(name: str, fwd, bwd) -> None:
        t_f = median(time_ms(fwd, dev, 5, args.iters, barrier=False, back_to_back=True))
        t_b = median(time_ms(bwd, dev, 5, args.iters, barrier=False, back_to_back=True))
        rows.append([name, t_f, 2 * mib / 1024 / (t_f / 1e3), t_b, 3 * mib / 1024 / (t_b / 1e3)])

    add("unfused (PyTorch)", unfused_fwd, unfused_bwd)
    # The autograd function's two halves called directly, with stand-in contexts.
    fwd_ctx = types.SimpleNamespace(save_for_backward=lambda *t: None)
    bwd_ctx = types.SimpleNamespace(saved_tensors=(x, bias), tanh=False)
    for r, c, w in itertools.product((16, 32), (128, 256), (4, 8)):
        bg.FWD_TILE = bg.BWD_TILE = {"BLOCK_R": r, "BLOCK_F": c, "num_warps": w}
        add(
            f"fused {r}x{c}, {w} warps",
            lambda: bg.BiasGeLU.forward(fwd_ctx, x, bias, False),
            lambda: bg.BiasGeLU.backward(bwd_ctx, dy),
        )
    headers = ["kernel", "fwd ms", "fwd GiB/s", "bwd ms", "bwd GiB/s"]
    log0(f"\nbias + GeLU, [{n}, {f}] bf16 ({torch.cuda.get_device_name()})\n")
    log0(markdown_table(headers, rows))
    if args.json:
        write_json(args.json, {"rows": n, "features": f, "table": [headers, *rows]})


if __name__ == "__main__":
    main()
