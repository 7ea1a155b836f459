"""``python -m megatron.validate`` in its CPU mode: rows pass, an injected gradient error
fails the command, the SP rows run under torchrun, bad requests get one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron.validate.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One row of each kind: backends (blockwise, Triton with documents), fused kernels, the
# gradient-accumulation path, and everything together.
SUBSET = (
    r"^gpt/(classic|sdpa|sdpa-blockwise|triton\+docs|fused-norm\+bias|grad-accum-2mb"
    r"|flash_attn|long-context-offload)$|^llama/(sdpa\+docs|checkpoint-in-cpu|all-sdpa)$"
)


def test_cpu_rows_pass(capsys):
    assert main(["--device", "cpu", "--only", SUBSET]) == 0
    out = capsys.readouterr().out
    assert "gpt/sdpa-blockwise" in out and "blockwise,cpu-flash" in out
    assert "gpt/flash_attn" in out and "SKIP: CUDA only" in out
    assert "cpu-flash,host-optimizer,tiled-mlp" in out  # the host-offloaded AdamW step ran
    assert "validate: 10 PASS, 0 FAIL, 1 SKIP" in out


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _WrongDQ(torch.nn.Module):
    """The layer's attention backend with its dQ 5% too large."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, q, k, v, **kwargs):
        return self.inner(_ScaleGrad.apply(q, 1.05), k, v, **kwargs)


def _wrong_dq_in_layer_0(model) -> None:
    core = model.transformer.layers[0].self_attention.core_attention
    core.backend = _WrongDQ(core.backend)


def test_injected_dq_error_fails(capsys):
    code = main(["--device", "cpu", "--only", "^gpt/sdpa$"], model_hook=_wrong_dq_in_layer_0)
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL gpt/sdpa: transformer.layers.0.self_attention.query_key_value.weight[q]" in out
    assert "layers.1" not in out.split("FAIL gpt/sdpa:")[1]  # only the broken layer


def test_sp_rows_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [
        "-m",
        "megatron.validate",
        "--device",
        "cpu",
        "--only",
        r"sp2(-triton\+docs|-rank)|ring2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validate: 7 PASS, 0 FAIL, 0 SKIP" in proc.stdout


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_no_cuda_device_is_one_line(capsys):
    assert main(["--only", "gpt/classic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0]


def test_only_matching_nothing(capsys):
    assert main(["--device", "cpu", "--only", "no-such-row"]) == 2
    assert "matches no row" in capsys.readouterr().err


def test_list_names_every_row(capsys):
    assert main(["--device", "cpu", "--list"]) == 0
    names = capsys.readouterr().out.split()
    for name in ("gpt/classic", "llama/all-triton+docs", "gpt/recompute-selective"):
        assert name in names
