"""Blockwise causal attention (megatron.model.blockwise_attention) against one SDPA call.

On CPU the blocks run PyTorch's fused CPU kernel: in float64 the output and the gradients
match one causal call to rounding, whatever the block count and the memory layout. The
model-level cases (SP 2 and 4, recompute, head-group overlap) are in
test_model_sp_equivalence.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model.attention_backends import build_local_attention
from megatron.model.blockwise_attention import blockwise_causal_attention, blockwise_causal_usable


def _qkv_sbhd(s: int, b: int, h: int, d: int, dtype, seed: int = 0):
    """[b, h, s, d] views of [s, b, h, d] tensors, as DistributedAttention hands them over."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, b, h, d, generator=g, dtype=dtype).permute(1, 2, 0, 3).requires_grad_()
        for _ in range(3)
    ]


@pytest.mark.parametrize("s,block", [(64, 16), (96, 32), (128, 64), (120, 8)])
@pytest.mark.parametrize("layout", ["bhsd", "sbhd"])
def test_matches_one_call_float64(s, block, layout):
    if layout == "sbhd":
        q, k, v = _qkv_sbhd(s, 2, 3, 8, torch.float64)
    else:
        q, k, v = (torch.randn(2, 3, s, 8, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    dout = torch.randn(2, 3, s, 8, dtype=torch.float64)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out = blockwise_causal_attention(q, k, v, block, 0.3)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert out.stride() == q.stride()  # the output keeps the input's memory layout
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_float32_and_strided_output_gradient():
    q, k, v = _qkv_sbhd(64, 1, 4, 16, torch.float32, seed=1)
    out = blockwise_causal_attention(q, k, v, 16, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # A gradient laid out unlike the output ([b, h, s, d] contiguous) is accepted.
    dout = torch.randn(1, 4, 64, 16)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_usable_only_for_several_blocks_and_equal_heads():
    q = torch.empty(1, 4, 64, 8)
    assert blockwise_causal_usable(q, q, 16)
    assert blockwise_causal_usable(q, q, 32)
    assert not blockwise_causal_usable(q, q, 64)  # one block: one call
    assert not blockwise_causal_usable(q, q, 0)
    assert not blockwise_causal_usable(q, q, 24)  # does not divide the sequence
    assert not blockwise_causal_usable(q, torch.empty(1, 2, 64, 8), 16)  # GQA


def test_sdpa_backend_blockwise_and_fallbacks():
    """The sdpa backend goes blockwise only without dropout and document mask, and gives
    the same result as its one-call path either way."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(64, 2, 4, 8, generator=g, dtype=torch.float64) for _ in "qkv")
    one = build_local_attention("sdpa", attention_dropout=0.0, softmax_scale=0.35)
    blocks = build_local_attention(
        "sdpa", attention_dropout=0.0, softmax_scale=0.35, sdpa_block_size=16
    )
    assert blocks._blockwise(*(t.permute(1, 2, 0, 3) for t in (q, k)), None)
    torch.testing.assert_close(blocks(q, k, v), one(q, k, v), rtol=0, atol=1e-12)
    doc_ids = torch.zeros(2, 64, dtype=torch.long)
    doc_ids[:, 40:] = 1
    assert not blocks._blockwise(*(t.permute(1, 2, 0, 3) for t in (q, k)), doc_ids)
    torch.testing.assert_close(blocks(q, k, v, doc_ids=doc_ids), one(q, k, v, doc_ids=doc_ids))
    dropping = build_local_attention(
        "sdpa", attention_dropout=0.1, softmax_scale=0.35, sdpa_block_size=16
    )
    assert not dropping._blockwise(*(t.permute(1, 2, 0, 3) for t in (q, k)), None)
    dropping.eval()  # no dropout outside training: blockwise again
    assert dropping._blockwise(*(t.permute(1, 2, 0, 3) for t in (q, k)), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN attention needs CUDA")
def test_cudnn_blocks_match_one_call_bf16():
    """On CUDA the blocks run cuDNN's kernels: bf16 output and gradients within bf16 rounding
    of one cuDNN call, and the gradients are that call's own backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    s, b, h, d = 8192, 1, 4, 128
    q, k, v = (
        torch.randn(s, b, h, d, device="cuda", dtype=torch.bfloat16)
        .permute(1, 2, 0, 3)
        .requires_grad_()
        for _ in "qkv"
    )
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out = blockwise_causal_attention(q, k, v, 2048, d**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(out, ref) < 4e-3, rel(out, ref)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert rel(got, want) < 8e-3, (name, rel(got, want))
