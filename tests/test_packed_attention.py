"""Packed documents in the ``sdpa`` backend (--use-flash-attn) on a GPU: O(s) memory.

The GPU routing (megatron.ops.attention_choice: our Triton kernel for documents, per-document
SDPA where it cannot run) is run here on CPU, the Triton kernel in its interpreter, under a
dispatch mode that records every tensor an operator produces: forward and backward build
nothing of ``s x s`` size, and the result equals the classic backend's dense-mask attention.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import megatron.model.attention_backends as backends
from megatron.ops import attention_choice
from megatron.ops.attention_choice import choose
from megatron.ops.packed_attention import cu_seqlens, document_bounds, document_loop_attention

S, B, HQ, HKV, D, SCALE = 256, 1, 2, 1, 64, 0.125  # q has S * 128 elements, S x S is twice
LENGTHS = [70, 90, 96]


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns, except the
    Triton interpreter's 1-D byte copies of its kernels' arguments (uint8 storages)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not (t.dtype == torch.uint8 and t.dim() == 1):
                self.largest = max(self.largest, t.numel())
        return out


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(S, B, HQ, D, generator=g, requires_grad=True)
    k, v = (torch.randn(S, B, HKV, D, generator=g, requires_grad=True) for _ in "kv")
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(LENGTHS))[None].expand(B, S)
    return q, k, v, doc_ids.to(torch.int32).contiguous()


def _reference(q, k, v, doc_ids):
    attn = backends.build_local_attention("classic", attention_dropout=0.0, softmax_scale=SCALE)
    return attn(q, k, v, doc_ids=doc_ids)


def _run_recorded(fn, q, k, v):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    with LargestTensor() as rec:
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, grads, dout, rec.largest


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter")
def test_gpu_routing_builds_no_s_by_s_tensor(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backends, "PACKED_ROUTED_DEVICES", ("cuda", "cpu"))
    attention_choice.log_choice.cache_clear()
    attn = backends.build_local_attention("sdpa", attention_dropout=0.0, softmax_scale=SCALE)
    q, k, v, doc_ids = _inputs()
    with caplog.at_level(logging.INFO, logger="megatron.ops.attention_choice"):
        out, grads, dout, largest = _run_recorded(lambda: attn(q, k, v, doc_ids=doc_ids), q, k, v)
    assert largest < S * S, largest
    assert any("documents: triton" in r.getMessage() for r in caplog.records)
    ref = _reference(q, k, v, doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_document_loop_builds_no_s_by_s_tensor() -> None:
    q, k, v, doc_ids = _inputs(seed=2)
    out, grads, dout, largest = _run_recorded(
        lambda: document_loop_attention(q, k, v, doc_ids, softmax_scale=SCALE), q, k, v
    )
    assert largest < S * S, largest
    ref = _reference(q, k, v, doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_dense_mask_would_be_seen() -> None:
    """The recorder catches the CPU path's [b, 1, s, s] mask (so the tests above can fail)."""
    attn = backends.build_local_attention("sdpa", attention_dropout=0.0, softmax_scale=SCALE)
    q, k, v, doc_ids = _inputs()
    *_, largest = _run_recorded(lambda: attn(q, k, v, doc_ids=doc_ids), q, k, v)
    assert largest >= S * S


def test_choice_table_and_fallbacks() -> None:
    cpu, bf16 = torch.device("cpu"), torch.bfloat16

    def kernel(mask, head_dim=128, dropout=False):
        return choose(cpu, mask=mask, seq=32768, head_dim=head_dim, dtype=bf16, dropout=dropout)

    assert kernel("causal").kernel == "sdpa"
    assert kernel("documents").kernel == "triton"
    assert kernel("documents", dropout=True).kernel == "doc-loop"
    assert kernel("documents", head_dim=80).kernel == "doc-loop"
    for gpu, entries in attention_choice.TABLE.items():
        assert {e[0] for e in entries} == set(attention_choice.MASKS), gpu
        assert {e[2] for e in entries} <= set(attention_choice.KERNELS), gpu


def test_document_bounds_and_cu_seqlens() -> None:
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 4], [2, 2, 2, 2, 2, 2]])
    assert document_bounds(doc_ids) == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]
    cu, longest = cu_seqlens(doc_ids)
    assert cu.tolist() == [0, 2, 5, 6, 12] and longest == 6


def test_triton_backend_fallback_builds_no_s_by_s_tensor() -> None:
    """Head dim 40 (not a Triton kernel's): SDPA per document, no dense mask."""
    from megatron.ops.flash_attn_triton import flash_attn_triton

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(S, B, 2, 40, generator=g, requires_grad=True) for _ in "qkv")
    _, _, _, doc_ids = _inputs()
    out, grads, dout, largest = _run_recorded(
        lambda: flash_attn_triton(q, k, v, doc_ids=doc_ids, softmax_scale=SCALE), q, k, v
    )
    assert largest < S * S, largest
    ref = _reference(q, k, v, doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA memory counters")
def test_sdpa_backend_packed_documents_on_cuda_stay_o_s() -> None:
    """On a GPU, 16K tokens of packed documents through the sdpa backend, forward and
    backward, allocate less than half of what the dense bool mask alone would (s^2 bytes)."""
    s, h, d = 16384, 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(s, 1, h, d, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    lengths = torch.tensor([3000, 5000, 4000, 4384])
    doc_ids = torch.repeat_interleave(torch.arange(4), lengths)[None].to("cuda", torch.int32)
    attn = backends.build_local_attention("sdpa", attention_dropout=0.0, softmax_scale=d**-0.5)
    attn._flash = None  # the routing, also where the flash_attn package is installed
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = attn(q, k, v, doc_ids=doc_ids)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < s * s // 2
    assert all(torch.isfinite(t).all() for t in (out, *grads))
