"""The fused Triton kernels and the chunked loss, on CPU: the kernels in the Triton
interpreter against fp64 references, each fused path in the model against the unfused one,
and every kernel compiled for sm_90 (no GPU needed). tests/test_fused_ops_cuda.py runs the
same kernels on a GPU in bf16 at the 1.3B model's sizes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import model_utils as mu
import pytest
import torch
import torch.nn.functional as F
from model_utils import LLAMA, make_batch, tiny_config

from megatron.model.loss import output_layer_cross_entropy
from megatron.ops import triton_kernels_can_run


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_plain(chunk, dtype, fused):
    """Chunked (and with ``fused``, the Triton cross entropy: on CPU in the interpreter, whose
    bf16 arithmetic is fine without ``tl.dot``) against the unchunked loss."""
    if fused and not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    hidden = torch.randn(24, 3, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 40, (3, 24))
    upstream = torch.rand(3, 24)
    results = []
    for size in (0, chunk):
        loss = output_layer_cross_entropy(hidden, weight, labels, size, fused=fused and size > 0)
        results.append((loss, *torch.autograd.grad((loss * upstream).sum(), [hidden, weight])))
    # With the loss mask as the weights: the gradients come out of the forward pass and
    # backward scales them by the incoming gradient (0.37 here).
    out = output_layer_cross_entropy(hidden, weight, labels, chunk, fused, loss_mask_bs=upstream)
    assert not out.per_token.requires_grad
    results.append((out.per_token, *torch.autograd.grad(0.37 * out.masked_sum, [hidden, weight])))
    results[0] = (results[0][0], *(0.37 * g for g in results[0][1:]))
    results[1] = (results[1][0], *(0.37 * g for g in results[1][1:]))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got_chunked, got_in_forward, want in zip(results[1], results[2], results[0]):
        assert got_chunked.dtype == got_in_forward.dtype == want.dtype
        torch.testing.assert_close(got_chunked, want, **tol)
        torch.testing.assert_close(got_in_forward, want, **tol)
    torch.testing.assert_close(out.masked_sum, (results[0][0] * upstream).sum(), **tol)


def test_chunked_loss_grad_in_forward_edges():
    """The in-forward gradients: none are computed without autograd, a second backward is an
    error, and with ``grad_in_forward`` off the mask's result is the same as with it on."""
    torch.manual_seed(1)
    hidden = torch.randn(10, 2, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    labels, mask = torch.randint(0, 30, (2, 10)), (torch.rand(2, 10) > 0.3).float()
    with torch.no_grad():
        out = output_layer_cross_entropy(hidden, weight, labels, 4, loss_mask_bs=mask)
    assert out.masked_sum.grad_fn is None
    grads = []
    for in_forward in (True, False):
        out = output_layer_cross_entropy(
            hidden, weight, labels, 4, loss_mask_bs=mask, grad_in_forward=in_forward
        )
        out.masked_sum.backward(retain_graph=True)
        grads.append((out.masked_sum.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
        if in_forward:
            with pytest.raises(RuntimeError, match="only once"):
                out.masked_sum.backward()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_cross_entropy_kernels_match_fp64():
    """The Triton kernels alone (interpreter on CPU): vocab sizes below, at and above one
    block, fp32 and fp16 logits; loss and in-place gradient against an fp64 reference."""
    if not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    from megatron.ops.cross_entropy_triton import (
        BLOCK_V,
        cross_entropy_backward_,
        cross_entropy_forward,
    )

    gen = torch.Generator().manual_seed(5)
    for dtype, vocab, tol in [
        (torch.float32, 37, 1e-6),
        (torch.float32, BLOCK_V + 3, 1e-6),
        (torch.float16, 2 * BLOCK_V, 1e-3),
    ]:
        logits = (3 * torch.randn(3, vocab, generator=gen)).to(dtype)
        labels = torch.randint(0, vocab, (3,), generator=gen)
        grad = torch.randn(3, generator=gen)
        ref = logits.double().requires_grad_()
        ref_loss = F.cross_entropy(ref, labels, reduction="none")
        ref_loss.backward(grad.double())
        loss, lse = cross_entropy_forward(logits, labels)
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-6, atol=1e-5)
        out = cross_entropy_backward_(logits.clone(), labels, lse, grad)
        assert out.dtype == dtype
        err = (out.double() - ref.grad).norm() / ref.grad.norm()
        assert err < tol, (dtype, vocab, err.item())


COMPILE_CE_KERNELS = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile

from megatron.ops import add_norm_triton as an
from megatron.ops import bias_gelu_triton as bg
from megatron.ops import cross_entropy_triton as ce

for kernel, last in ((ce._ce_fwd_kernel, "LOSS"), (ce._ce_bwd_kernel, "GRAD")):
    for dtype in ("bf16", "fp16", "fp32"):
        sig = {"LOGITS": "*" + dtype, "stride_row": "i64", "LABELS": "*i64", "LSE": "*fp32",
               last: "*fp32", "V": "constexpr", "BLOCK": "constexpr"}
        src = ASTSource(fn=kernel, signature=sig, constexprs={"V": 50304, "BLOCK": 4096})
        assert "cubin" in compile(src, target=GPUTarget("cuda", 90, 32)).asm
rows = {"X": "*fp32", "Y": "*bf16", "YB": "*bf16", "W": "*bf16", "B": "*bf16", "R": "*fp32",
        "OUT": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32", "eps": "fp32"}
for rms in (False, True):
    consts = {"H": 2048, "BLOCK": 2048, "RMS": rms, "HAS_BIAS": not rms, "HAS_YB": not rms}
    sig = {**rows, **dict.fromkeys(consts, "constexpr")}
    src = ASTSource(fn=an._add_norm_fwd_kernel, signature=sig, constexprs=consts)
    assert "cubin" in compile(src, target=GPUTarget("cuda", 90, 32)).asm
    consts = {"H": 2048, "BLOCK": 2048, "ROWS": 32, "RMS": rms, "HAS_BIAS": not rms,
              "HAS_DR_IN": True, "SAME_DY": False, "HAS_YB": not rms}
    sig = {"DOUT": "*bf16", "DR_IN": "*fp32", "R": "*fp32", "W": "*bf16", "MEAN": "*fp32",
           "RSTD": "*fp32", "DX": "*fp32", "DY": "*bf16", "DW_PART": "*fp32",
           "DB_PART": "*fp32", "DYB_PART": "*fp32", "n_rows": "i32",
           **dict.fromkeys(consts, "constexpr")}
    src = ASTSource(fn=an._add_norm_bwd_kernel, signature=sig, constexprs=consts)
    assert "cubin" in compile(src, target=GPUTarget("cuda", 90, 32)).asm
for tanh in (False, True):
    consts = {"F_": 8192, "TANH": tanh, "BLOCK_R": 16, "BLOCK_F": 256}
    sig = {"X": "*bf16", "B": "*bf16", "Y": "*bf16", "n_rows": "i32",
           **dict.fromkeys(consts, "constexpr")}
    src = ASTSource(fn=bg._bias_gelu_fwd_kernel, signature=sig, constexprs=consts)
    assert "cubin" in compile(src, target=GPUTarget("cuda", 90, 32)).asm
    consts["TILES"] = 8
    sig = {"DY": "*bf16", "X": "*bf16", "B": "*fp32", "DX": "*bf16", "DB_PART": "*fp32",
           "n_rows": "i32", **dict.fromkeys(consts, "constexpr")}
    src = ASTSource(fn=bg._bias_gelu_bwd_kernel, signature=sig, constexprs=consts)
    assert "cubin" in compile(src, target=GPUTarget("cuda", 90, 32)).asm
print("ok")
"""


def test_fused_kernels_compile_for_hopper():
    """The interpreter accepts what the compiler rejects (e.g. a plain global in a kernel):
    compile the fused cross-entropy and add + norm kernels for sm_90 (Triton's bundled ptxas,
    no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_CE_KERNELS], env=env, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_fused_add_norm_matches_fp64(rms):
    """``--fused-residual-norm``'s kernels (interpreter on CPU) against fp64: the residual, the
    norm's output in a lower dtype, and the gradients of both inputs and the weights."""
    if not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    from megatron.ops.add_norm_triton import fused_add_norm

    torch.manual_seed(4)
    h = 96  # not a power of two: masked lanes
    for y_dtype, w_dtype, out_dtype, tol, with_y_bias in [
        (torch.float32, torch.float32, torch.float32, 1e-6, False),
        (torch.float32, torch.float32, torch.float32, 1e-6, True),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, 1e-2, True),
        (torch.float16, torch.float32, torch.float16, 1e-3, False),
    ]:
        norm = torch.nn.RMSNorm(h, eps=1e-5) if rms else torch.nn.LayerNorm(h, eps=1e-5)
        with torch.no_grad():
            for p in norm.parameters():
                p.copy_(torch.randn(h))
        norm = norm.to(w_dtype)
        x = torch.randn(5, 3, h, requires_grad=True)
        y = torch.randn(5, 3, h).to(y_dtype).requires_grad_()
        # the linear's bias added in the same pass (bias-dropout-add fusion)
        y_bias = torch.randn(h).to(w_dtype).requires_grad_() if with_y_bias else None
        grad_r, grad_out = torch.randn(5, 3, h), torch.randn(5, 3, h).to(out_dtype)
        r, out = fused_add_norm(x, y, norm, out_dtype, y_bias)
        assert (r.dtype, out.dtype) == (torch.float32, out_dtype)
        torch.autograd.backward([r, out], [grad_r, grad_out])
        params = list(norm.parameters())
        ref_in = [t.detach().double().requires_grad_() for t in [x, y, *params]]
        ref_r = ref_in[0] + ref_in[1]
        if with_y_bias:
            ref_y_bias = y_bias.detach().double().requires_grad_()
            ref_r = ref_r + ref_y_bias
        bias = None if rms else ref_in[3]
        ref_out = (
            F.rms_norm(ref_r, (h,), ref_in[2], 1e-5)
            if rms
            else F.layer_norm(ref_r, (h,), ref_in[2], bias, 1e-5)
        )
        torch.autograd.backward([ref_r, ref_out], [grad_r.double(), grad_out.double()])
        got = [r, out, x.grad, y.grad, *(p.grad for p in params)]
        want = [ref_r, ref_out, *(t.grad for t in ref_in)]
        names = ["r", "out", "dx", "dy", "dw", "db"][: len(got)]
        if with_y_bias:
            got, want, names = got + [y_bias.grad], want + [ref_y_bias.grad], names + ["dyb"]
            assert y_bias.grad.dtype == w_dtype
        for name, g, w in zip(names, got, want):
            err = ((g.double() - w).norm() / w.norm()).item()
            assert err < tol, (name, y_dtype, err)
        assert y.grad.dtype == y_dtype and params[0].grad.dtype == w_dtype


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_fp64(approximate):
    """The bias-GeLU kernels (interpreter on CPU) against fp64: the output and the input and
    bias gradients, with rows and features that fill no tile (masked lanes) and more rows
    than one backward program takes."""
    if not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    from megatron.ops import bias_gelu

    gen = torch.Generator().manual_seed(8)
    for x_dtype, b_dtype, rows, tol in [
        (torch.float32, torch.float32, 37, 1e-6),
        (torch.float16, torch.float32, 1100, 2e-3),
    ]:
        x = (2 * torch.randn(rows, 300, generator=gen)).to(x_dtype).requires_grad_()
        bias = torch.randn(300, generator=gen).to(b_dtype).requires_grad_()
        grad = torch.randn(rows, 300, generator=gen).to(x_dtype)
        y = bias_gelu(x, bias, approximate, use_triton=True)
        y.backward(grad)
        ref_in = [t.detach().double().requires_grad_() for t in (x, bias)]
        ref = F.gelu(ref_in[0] + ref_in[1], approximate=approximate)
        ref.backward(grad.double())
        assert (y.dtype, x.grad.dtype, bias.grad.dtype) == (x_dtype, x_dtype, b_dtype)
        for name, g, w in [("y", y, ref), ("dx", x.grad, ref_in[0].grad),
                           ("db", bias.grad, ref_in[1].grad)]:  # fmt: skip
            err = ((g.double() - w).norm() / w.norm()).item()
            assert err < tol, (name, x_dtype, err)


def test_bias_gelu_fusion_in_the_model():
    """The MLP with ``bias_gelu_fusion`` (first linear without bias, then the bias-GeLU op:
    PyTorch's ops off CUDA) computes what the unfused one does, also with the deferred
    weight gradients' linear (``delay_wgrad_compute`` needs SP; here its linear directly)."""
    from megatron.model import deferred_wgrad
    from megatron.model.mlp import ParallelMLP

    torch.manual_seed(9)
    x = torch.randn(6, 2, 64)
    grads = {}
    for fused, queue in [(False, None), (True, None), (True, deferred_wgrad.WgradQueue())]:
        torch.manual_seed(3)
        mlp = ParallelMLP(tiny_config(bias_gelu_fusion=fused), wgrad_queue=queue)
        assert mlp.bias_gelu_fusion == fused
        xi = x.clone().requires_grad_()
        out = mlp(xi)
        out.square().sum().backward()
        if queue is not None:
            queue.run()
        grads[fused, queue is not None] = [out, xi.grad] + [p.grad for p in mlp.parameters()]
    for got in grads.values():
        for g, w in zip(got, grads[False, False]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["gpt", "gpt-nobdf", "llama"])
def test_fused_residual_norm_in_the_model(style):
    """The layer with ``fused_residual_norm`` computes what the unfused one does, in fp32
    and under bf16 autocast (where the norm's output goes straight to bf16; the Triton
    interpreter rounds fp32 -> bf16 by truncation, GPUs and PyTorch to nearest even, hence
    the looser bf16 tolerance here). GPT's output projections' biases move into the fused
    pass (``bias_dropout_fusion``, the default) or stay in their linears (``nobdf``)."""
    if not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    batch = make_batch(2, seed=6)
    extra = {"gpt": {}, "gpt-nobdf": {"bias_dropout_fusion": False}, "llama": LLAMA}[style]
    for autocast in (False, True) if style != "gpt-nobdf" else (False,):
        out = {}
        for fused in (False, True):
            model = mu.build_model(seed=3, fused_residual_norm=fused, **extra)
            layer = model.transformer.layers[0]
            assert layer.fuses_bias(torch.device("cpu")) == (fused and style == "gpt")
            ctx = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if autocast
                else contextlib.nullcontext()
            )
            with ctx:
                loss = mu.forward_loss(model, batch)
            loss.backward()
            out[fused] = (loss.item(), mu.grads_of(model))
        rel = 1e-6 if not autocast else 1e-2
        assert out[True][0] == pytest.approx(out[False][0], rel=rel)
        mu.assert_grads_close(out[True][1], out[False][1], rtol=1e-5 if not autocast else 2e-2)


def test_fused_residual_norm_across_recompute_segments():
    """Block recompute of the first layer: the checkpointed segment returns the summed
    residual, the later layers hand their MLP output (and its bias) unsummed to the next norm
    (the last one to the final norm's fused add). Fused equals unfused in fp32."""
    if not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    batch = make_batch(2, seed=7)
    recompute = {"recompute_granularity": "full", "recompute_method": "block",
                 "recompute_num_layers": 1, "num_layers": 3}  # fmt: skip
    out = {}
    for fused in (False, True):
        model = mu.build_model(seed=5, fused_residual_norm=fused, **recompute)
        loss = mu.forward_loss(model, batch)
        loss.backward()
        out[fused] = (loss.item(), mu.grads_of(model))
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    mu.assert_grads_close(out[True][1], out[False][1], rtol=1e-5)


def test_chunked_loss_in_the_model():
    batch = make_batch(2, seed=3)
    out = {}
    fusable = triton_kernels_can_run(torch.device("cpu"))
    for chunk, fused in [(0, False), (37, False)] + ([(37, True)] if fusable else []):
        model = mu.build_model(
            seed=2, loss_chunk_size=chunk, untie_embeddings_and_output_weights=True,
            cross_entropy_fusion=fused,
        )  # fmt: skip
        loss = mu.forward_loss(model, batch)
        loss.backward()
        out[chunk, fused] = (loss.item(), mu.grads_of(model))
    for key in out:
        assert out[key][0] == pytest.approx(out[0, False][0], rel=1e-6)
        mu.assert_grads_close(out[key][1], out[0, False][1])


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_add_norm_implementations_agree(rms):
    """The two implementations of the layers' add + norm seam (megatron.model.residual): a
    layer-like chain of adds and norms, each add pending (a ``Residual``) until the next norm.
    The Triton one adds and normalises in one pass and, without dropout, takes the output
    bias; the plain one uses PyTorch's ops. Same values and gradients in fp32."""
    if not triton_kernels_can_run(torch.device("cpu")):
        pytest.skip("the fused kernels need CUDA or TRITON_INTERPRET=1")
    from megatron.model.norms import build_norm
    from megatron.model.residual import AddNorm, Residual, TritonAddNorm

    config = tiny_config(hidden_size=16, normalization="RMSNorm" if rms else "LayerNorm")
    torch.manual_seed(0)
    x0 = torch.randn(6, 2, 16)
    ys = [torch.randn(6, 2, 16) for _ in range(2)]
    bias = torch.randn(16)
    out = {}
    for seam in (AddNorm(config), TritonAddNorm(config)):
        torch.manual_seed(1)
        norms = [build_norm(config) for _ in range(3)]
        for n in norms:
            n.weight.data.uniform_(0.5, 1.5)
        x = x0.clone().requires_grad_()
        leaves = [y.clone().requires_grad_() for y in ys] + [bias.clone().requires_grad_()]
        fused_bias = seam.fuses_bias(x.device)
        assert fused_bias == isinstance(seam, TritonAddNorm)
        stream, h = seam.norm(x, norms[0], norms[0].weight)
        for y, norm in zip(leaves[:2], norms[1:]):
            y = y * h  # the block's output depends on the normed input
            if fused_bias:
                stream = seam.add(stream, y, leaves[2])
            else:
                stream = seam.add(stream, y + leaves[2])
            assert isinstance(stream, Residual)
            stream, h = seam.norm(stream, norm, norm.weight)
        h.square().sum().backward()
        grads = [t.grad for t in leaves] + [n.weight.grad for n in norms]
        out[type(seam)] = [h, x.grad, *grads]
    for got, want in zip(out[TritonAddNorm], out[AddNorm]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_deferrable_linear_is_nn_linear_until_queued():
    """``DeferrableLinear`` without a queue is ``nn.Linear`` (same values, gradients at once);
    with one, the weight gradient waits for the queue and then equals the plain one."""
    from megatron.model.deferred_wgrad import DeferrableLinear, WgradQueue

    torch.manual_seed(0)
    plain = torch.nn.Linear(16, 8)
    lin = DeferrableLinear(16, 8)
    lin.load_state_dict(plain.state_dict())
    x = torch.randn(5, 2, 16)
    plain(x).square().sum().backward()
    for queue in (None, WgradQueue()):
        lin.zero_grad(set_to_none=True)
        lin.wgrad_queue = queue
        out = lin(x)
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
        out.square().sum().backward()
        if queue is not None:
            assert lin.weight.grad is None and queue.pending == 1
            queue.run()
        torch.testing.assert_close(lin.weight.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lin.bias.grad, plain.bias.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(lin(x, add_bias=False), F.linear(x, plain.weight))
