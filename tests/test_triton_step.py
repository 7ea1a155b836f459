"""The Triton attention step (TritonStep) against the classic step, in the Triton interpreter.

One block of queries against one block of keys, with separate query and key document ids,
offsets that put the block on, below or across the causal diagonal, and GQA: the output, the
log-sum-exp and the gradients from a given merged output and log-sum-exp match the classic
(fp32 reference) step; two key blocks merged equal one call over both; a whole causal
sequence cut into steps equals one full attention; queries that see no key give a zero row,
lse -inf and zero gradients; the fused-dQ backward equals the two-kernel one. fp32 (and one
fp16 case): the interpreter computes bf16 dots wrongly.
"""

from __future__ import annotations

import os

import pytest
import torch

import megatron.ops.flash_attn_triton as fa
from megatron.model.attention_step import CLASSIC_STEP, TRITON_STEP, TritonStep, merge

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter: fp32, exact dots. On a GPU fp16 (fp32 kernels compile for minutes there).
DTYPE, TOL = (torch.float16, 1e-2) if CUDA else (torch.float32, 2e-5)
S, B, HQ, D, SCALE = 48, 2, 4, 64, 0.125
# Packed rows: three documents; one document. Non-decreasing, so any slice is too.
DOCS = torch.tensor([[0] * 10 + [1] * 23 + [2] * 15, [5] * 48], dtype=torch.int32)


def _inputs(s_q: int, s_k: int, hkv: int, dtype=DTYPE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def t(s, h):
        return torch.randn(s, B, h, D, generator=g).to(DEVICE, dtype)

    return t(s_q, HQ), t(s_k, hkv), t(s_k, hkv), t(s_q, HQ)  # q, k, v, dout


def _close(got, want, tol=TOL):
    """Norm-relative error below ``tol`` (absolute when ``want`` is zero)."""
    err = (got.double() - want.double()).norm().item()
    assert err <= tol * max(want.double().norm().item(), 1.0), (err, tol)


# (q rows, k rows, causal, with documents): on, below, across and above-but-near the diagonal.
BLOCKS = {
    "diagonal_docs": (slice(0, 48), slice(0, 48), "diagonal", True),
    "below_docs": (slice(32, 48), slice(0, 20), "diagonal", True),
    "across_docs": (slice(16, 40), slice(8, 48), "diagonal", True),
    "across_nodocs": (slice(5, 37), slice(20, 45), "diagonal", False),
    "none_docs": (slice(3, 29), slice(17, 48), "none", True),
    "none_nodocs": (slice(0, 33), slice(0, 48), "none", False),
}


@pytest.mark.parametrize(
    "name,hkv", [(n, (4, 2, 1)[i % 3]) for i, n in enumerate(sorted(BLOCKS))]
)  # GQA groups of 1, 2 and 4 over the blocks
def test_step_matches_classic(name: str, hkv: int) -> None:
    qs, ks, causal, docs = BLOCKS[name]
    q, k, v, dout = _inputs(qs.stop - qs.start, ks.stop - ks.start, hkv, seed=len(name) + hkv)
    kw = {"causal": causal, "q_offset": qs.start, "k_offset": ks.start, "softmax_scale": SCALE}
    if docs:
        kw.update(q_doc_ids=DOCS[:, qs].to(DEVICE), k_doc_ids=DOCS[:, ks].to(DEVICE))
    out, lse = TRITON_STEP(q, k, v, **kw)
    ref_out, ref_lse = CLASSIC_STEP(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    _close(out, ref_out)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen)  # -inf exactly where no key is seen
    _close(lse[seen], ref_lse[seen])
    # Backward from a "merged" output and lse that are not this block's own (as after merging
    # other key blocks): the kernel must use the given ones.
    merged_out = ref_out.float() * 0.7 + 0.1
    merged_lse = torch.where(seen, ref_lse + 0.3, ref_lse)
    grads = TRITON_STEP.backward(dout, q, k, v, merged_out, merged_lse, **kw)
    ref_grads = CLASSIC_STEP.backward(dout, q, k, v, merged_out, merged_lse, **kw)
    for got, want, like in zip(grads, ref_grads, (q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype
        _close(got, want)


def test_two_key_blocks_merged_equal_one_call() -> None:
    """Keys [0, 20) and [20, 48) merged by log-sum-exp = one step over [0, 48); the backward
    of each block from the merged result sums to the one call's gradients."""
    q, k, v, dout = _inputs(24, 48, 2, seed=3)
    docs = {"q_doc_ids": DOCS[:, 24:].to(DEVICE)}
    kw = {"causal": "diagonal", "q_offset": 24, "softmax_scale": SCALE}
    one_out, one_lse = TRITON_STEP(q, k, v, **kw, **docs, k_doc_ids=DOCS.to(DEVICE))
    parts = [slice(0, 20), slice(20, 48)]
    res = [
        TRITON_STEP(q, k[p], v[p], **kw, **docs, k_offset=p.start, k_doc_ids=DOCS[:, p].to(DEVICE))
        for p in parts
    ]
    out, lse = merge(*res[0], *res[1])
    _close(out, one_out)
    _close(lse, one_lse)
    one = TRITON_STEP.backward(dout, q, k, v, one_out, one_lse, **kw, **docs,
                               k_doc_ids=DOCS.to(DEVICE))  # fmt: skip
    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for p in parts:
        g = TRITON_STEP.backward(dout, q, k[p], v[p], out, lse, **kw, **docs, k_offset=p.start,
                                 k_doc_ids=DOCS[:, p].to(DEVICE))  # fmt: skip
        dq += g[0]
        dks.append(g[1])
        dvs.append(g[2])
    _close(dq, one[0])
    _close(torch.cat(dks), one[1])
    _close(torch.cat(dvs), one[2])


def test_chunked_causal_sequence_equals_full_attention() -> None:
    """Query chunks of 16 against key chunks of 20, merged, = the one-call Triton attention
    with documents (autograd through megatron.ops.flash_attn_triton)."""
    q, k, v, dout = _inputs(S, S, 2, seed=5)
    docs = DOCS.to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fa.flash_attn_triton(*leaves, causal=True, softmax_scale=SCALE, doc_ids=docs)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    qs = [slice(i, min(i + 16, S)) for i in range(0, S, 16)]
    ks = [slice(j, min(j + 20, S)) for j in range(0, S, 20)]

    def kw(i, j):
        return dict(q_doc_ids=docs[:, i], k_doc_ids=docs[:, j], causal="diagonal",
                    q_offset=i.start, k_offset=j.start, softmax_scale=SCALE)  # fmt: skip

    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for i in qs:
        acc = None
        for j in ks:
            o, lse = TRITON_STEP(q[i], k[j], v[j], **kw(i, j))
            acc = (o.float(), lse) if acc is None else merge(*acc, o, lse)
        _close(acc[0], ref[i])
        for j in ks:
            dq, dk, dv = TRITON_STEP.backward(dout[i], q[i], k[j], v[j], *acc, **kw(i, j))
            grads[0][i] += dq
            grads[1][j] += dk
            grads[2][j] += dv
    for got, want in zip(grads, ref_grads):
        _close(got, want)


def test_queries_that_see_no_key() -> None:
    """Query documents absent from the key block: zero rows, lse -inf, zero gradients; the
    other rows are unaffected."""
    q, k, v, dout = _inputs(16, 16, 4, seed=7)
    q_docs = torch.tensor([[1] * 8 + [3] * 8, [2] * 16], dtype=torch.int32, device=DEVICE)
    k_docs = torch.tensor([[0] * 4 + [1] * 12, [0] * 16], dtype=torch.int32, device=DEVICE)
    kw = {"q_doc_ids": q_docs, "k_doc_ids": k_docs, "softmax_scale": SCALE}
    out, lse = TRITON_STEP(q, k, v, **kw)
    ref_out, ref_lse = CLASSIC_STEP(q, k, v, **kw)
    assert torch.isneginf(lse[0, :, 8:]).all() and torch.isneginf(lse[1]).all()
    assert (out[8:, 0] == 0).all() and (out[:, 1] == 0).all()
    _close(out, ref_out)
    _close(lse[0, :, :8], ref_lse[0, :, :8])
    grads = TRITON_STEP.backward(dout, q, k, v, out, lse, **kw)
    ref_grads = CLASSIC_STEP.backward(dout, q, k, v, ref_out, ref_lse, **kw)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        _close(got, want)
    assert (grads[0][:, 1] == 0).all()


@pytest.mark.skipif(CUDA, reason="the GPU runs every case in fp16")
def test_fp16_step_close_to_classic() -> None:
    q, k, v, dout = _inputs(32, 40, 2, dtype=torch.float16, seed=9)
    kw = {"causal": "diagonal", "q_offset": 16, "k_offset": 0, "softmax_scale": SCALE,
          "q_doc_ids": DOCS[:, 16:].to(DEVICE), "k_doc_ids": DOCS[:, :40].to(DEVICE)}  # fmt: skip
    out, lse = TRITON_STEP(q, k, v, **kw)
    ref_out, ref_lse = CLASSIC_STEP(q, k, v, **kw)
    _close(out, ref_out, 2e-3)
    _close(lse, ref_lse, 2e-3)
    grads = TRITON_STEP.backward(dout, q, k, v, ref_out, ref_lse, **kw)
    for got, want in zip(grads, CLASSIC_STEP.backward(dout, q, k, v, ref_out, ref_lse, **kw)):
        _close(got, want, 5e-3)


@pytest.mark.parametrize("name", ["across_docs", "none_nodocs"])
def test_fused_dq_equals_two_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    qs, ks, causal, docs = BLOCKS[name]
    q, k, v, dout = _inputs(qs.stop - qs.start, ks.stop - ks.start, 2, seed=11)
    kw = {"causal": causal, "q_offset": qs.start, "k_offset": ks.start, "softmax_scale": SCALE}
    if docs:
        kw.update(q_doc_ids=DOCS[:, qs].to(DEVICE), k_doc_ids=DOCS[:, ks].to(DEVICE))
    out, lse = TRITON_STEP(q, k, v, **kw)
    two = TRITON_STEP.backward(dout, q, k, v, out, lse, **kw)
    monkeypatch.setattr(fa, "FUSED_DQ", True)
    fused = TRITON_STEP.backward(dout, q, k, v, out, lse, **kw)
    for got, want in zip(fused, two):
        _close(got, want)
    # And through autograd (the --use-flash-attn-triton path), GQA with documents.
    leaves = [t.clone().requires_grad_() for t in _inputs(S, S, 2, seed=12)[:3]]
    o = fa.flash_attn_triton(*leaves, doc_ids=DOCS.to(DEVICE), softmax_scale=SCALE)
    fused_grads = torch.autograd.grad(o, leaves, dout.new_ones(o.shape))
    monkeypatch.setattr(fa, "FUSED_DQ", False)
    o = fa.flash_attn_triton(*leaves, doc_ids=DOCS.to(DEVICE), softmax_scale=SCALE)
    for got, want in zip(fused_grads, torch.autograd.grad(o, leaves, dout.new_ones(o.shape))):
        _close(got, want)


def test_unsupported_head_dim_runs_the_classic_step() -> None:
    g = torch.Generator().manual_seed(13)
    q = torch.randn(8, 1, 2, 40, generator=g, dtype=torch.float64)
    assert not TritonStep.kernel_takes(q)
    out, lse = TRITON_STEP(q, q, q, causal="diagonal", softmax_scale=SCALE)
    ref_out, ref_lse = CLASSIC_STEP(q, q, q, causal="diagonal", softmax_scale=SCALE)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
