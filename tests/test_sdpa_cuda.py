"""The sdpa backend's gradients on CUDA (skipped without a GPU), and the helper behind them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model.attention_backends import build_local_attention
from megatron.ops import contiguous_grad


def test_contiguous_grad_is_identity_with_a_contiguous_gradient():
    x = torch.randn(4, 2, 3, 5, requires_grad=True)
    x_bhsd = x.permute(1, 2, 0, 3)
    seen = []
    x_bhsd.register_hook(lambda g: seen.append(g.is_contiguous()))
    y = contiguous_grad(x_bhsd)
    assert torch.equal(y, x_bhsd)
    # The gradient comes back as a [b, h, s, d] view of [s, b, h, d] memory; what reaches
    # the op before contiguous_grad (SDPA's backward) is contiguous, with the same values.
    y.permute(2, 0, 1, 3).backward(torch.arange(120.0).view(4, 2, 3, 5))
    assert seen == [True]
    assert torch.equal(x.grad, torch.arange(120.0).view(4, 2, 3, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs CUDA")
@pytest.mark.parametrize(
    "block", [0, 1024]
)  # one call; blockwise (megatron.model.blockwise_attention)
def test_sdpa_backend_gradients_on_cuda(block):
    """The sdpa backend's gradients on CUDA against fp32 math attention, with the context's
    gradient laid out [s, b, h, d] as the layer hands it back (torch 2.11's cuDNN backward
    got that layout wrong unless made contiguous first)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    s, b, h, d = 4096, 2, 4, 128
    q, k, v = (torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16)
    attn = build_local_attention(
        "sdpa", attention_dropout=0.0, softmax_scale=d**-0.5, sdpa_block_size=block
    )
    out = attn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qf, kf, vf = (t.detach().float().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=d**-0.5)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout.float().permute(1, 2, 0, 3))

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(out.permute(1, 2, 0, 3), ref) < 4e-3
    for name, got, want in zip("qkv", grads, ref_grads):
        assert rel(got.permute(1, 2, 0, 3), want) < 8e-3, (name, rel(got.permute(1, 2, 0, 3), want))
