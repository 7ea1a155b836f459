"""Triton FlashAttention-2 (megatron.ops.flash_attn_triton) vs an fp64 PyTorch reference.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
there bf16 ``tl.dot`` is broken, so CPU covers fp32 (rel. error < 1e-4) and fp16. On a GPU the
same cases also run in fp16/bf16, plus a few larger shapes (fp32 only for a few, see
GPU_FP32_CASES). Rule for fp16/bf16: our
norm-relative error vs fp64 is at most 2x that of the naive PyTorch attention computed in the
same dtype, plus a small floor.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import megatron.ops.flash_attn_triton as fa
from megatron.ops.flash_attn_triton import flash_attn_triton

CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not INTERP:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

# Document boundaries aligned to every block size the kernels may pick, so whole key blocks of
# other documents are skippable (16 in the interpreter, <= 128 on GPU).
ALIGN = 16 if INTERP else 128
needs_gpu = pytest.mark.skipif(not CUDA, reason="bf16 tl.dot is wrong in the interpreter")
# fp32 on GPU uses FMA (ieee) dots: each case's kernels took ~1-2 min to compile on an H100, so
# the GPU runs one fp32 case (the interpreter runs all); fp16/bf16 cover the rest there.
GPU_FP32_CASES = ("causal_mqa_d128",)
slow_on_gpu = pytest.mark.skipif(CUDA, reason="fp32 kernels compile slowly on GPU")


def doc_ids_from_lengths(lengths_per_batch: list[list[int]]) -> torch.Tensor:
    """[b, s] int32 non-decreasing document ids from per-row document lengths."""
    rows = [
        torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_batch
    ]
    return torch.stack(rows).to(torch.int32)


def naive_attention(q, k, v, causal: bool, doc_ids, scale: float | None = None) -> torch.Tensor:
    """Explicit-mask attention in q's dtype; all tensors [b, s, h, d] (bshd)."""
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale else d**-0.5)
    keep = torch.ones(s, s, dtype=torch.bool, device=q.device)
    keep = keep.tril() if causal else keep
    keep = keep[None, None].expand(b, 1, s, s)
    if doc_ids is not None:
        doc = doc_ids.to(q.device)
        keep = keep & (doc[:, :, None] == doc[:, None, :])[:, None]
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(case: dict, dtype: torch.dtype, seed: int):
    """(q, k, v, leaves) in case["layout"]; with noncontig, q/k/v are head slices of one buffer."""
    gen = torch.Generator().manual_seed(seed)
    b, s, hq, hkv, d = case["b"], case["s"], case["hq"], case["hkv"], case["d"]
    if case.get("noncontig"):
        shape = (
            (s, b, hq + 2 * hkv + 1, d) if case["layout"] == "sbhd" else (b, s, hq + 2 * hkv + 1, d)
        )
        buf = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
        q, k, v = buf[:, :, :hq], buf[:, :, hq : hq + hkv], buf[:, :, hq + hkv : hq + 2 * hkv]
        assert not q.is_contiguous()
        return q, k, v, (buf,)
    leaves = []
    for h in (hq, hkv, hkv):
        shape = (s, b, h, d) if case["layout"] == "sbhd" else (b, s, h, d)
        leaves.append(torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_())
    return (*leaves, tuple(leaves))


def to_bshd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.transpose(0, 1) if layout == "sbhd" else t


CASES = {
    "causal_b2_s37": dict(layout="bshd", b=2, s=37, hq=2, hkv=2, d=64, causal=True),
    "noncausal_gqa_s50": dict(layout="sbhd", b=1, s=50, hq=4, hkv=2, d=64, causal=False),
    "causal_mqa_d128": dict(layout="sbhd", b=1, s=33, hq=4, hkv=1, d=128, causal=True),
    "docs_causal_d96": dict(layout="bshd", b=2, s=50, hq=2, hkv=1, d=96, causal=True,
                            docs=[[13, 20, 17], [30, 20]]),
    "docs_noncausal_gqa": dict(layout="sbhd", b=1, s=45, hq=4, hkv=2, d=64, causal=False,
                               docs=[[17, 11, 17]]),
    "noncontig_sbhd_docs": dict(layout="sbhd", b=2, s=40, hq=2, hkv=1, d=64, causal=True,
                                noncontig=True, docs=[[40], [9, 31]]),
    "noncontig_bshd": dict(layout="bshd", b=1, s=29, hq=4, hkv=2, d=128, causal=False,
                           noncontig=True),
}  # fmt: skip
GPU_CASES = {
    "gpu_long_docs": dict(layout="sbhd", b=2, s=1000, hq=8, hkv=2, d=128, causal=True,
                          docs=[[300, 1, 499, 200], [1000]]),
    "gpu_long_noncausal": dict(layout="bshd", b=1, s=777, hq=4, hkv=4, d=64, causal=False),
    "gpu_2k_gqa_d96": dict(layout="sbhd", b=1, s=2048, hq=8, hkv=1, d=96, causal=True),
}  # fmt: skip

PARAMS = [
    pytest.param(n, torch.float32, id=f"{n}-fp32", marks=[] if n in GPU_FP32_CASES else slow_on_gpu)
    for n in CASES
]
PARAMS += [
    pytest.param(n, torch.float16, id=f"{n}-fp16") for n in ("causal_b2_s37", "docs_causal_d96")
]
PARAMS += [
    pytest.param(n, torch.float16, id=f"{n}-fp16", marks=needs_gpu)
    for n in CASES
    if n not in ("causal_b2_s37", "docs_causal_d96")
]
PARAMS += [pytest.param(n, torch.bfloat16, id=f"{n}-bf16", marks=needs_gpu) for n in CASES]
PARAMS += [pytest.param(n, dt, id=f"{n}-{str(dt)[6:]}", marks=needs_gpu)
           for n in GPU_CASES for dt in (torch.bfloat16, torch.float16)]  # fmt: skip


@pytest.mark.parametrize("name,dtype", PARAMS)
def test_matches_fp64_reference(name: str, dtype: torch.dtype) -> None:
    case = {**CASES, **GPU_CASES}[name]
    seed = 1000 + sorted({**CASES, **GPU_CASES}).index(name)
    q, k, v, leaves = make_inputs(case, dtype, seed)
    doc_ids = doc_ids_from_lengths(case["docs"]).to(DEVICE) if "docs" in case else None
    layout, causal = case["layout"], case["causal"]

    out = flash_attn_triton(q, k, v, causal=causal, doc_ids=doc_ids, layout=layout)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    ours = [out, *torch.autograd.grad(out, leaves, dout)]

    def reference(cast: torch.dtype) -> list[torch.Tensor]:
        leaves_c = [t.detach().to(cast).requires_grad_() for t in leaves]
        if case.get("noncontig"):
            (buf,) = leaves_c
            hq, hkv = case["hq"], case["hkv"]
            qc, kc, vc = (
                buf[:, :, :hq],
                buf[:, :, hq : hq + hkv],
                buf[:, :, hq + hkv : hq + 2 * hkv],
            )
        else:
            qc, kc, vc = leaves_c
        o = naive_attention(*(to_bshd(t, layout) for t in (qc, kc, vc)), causal, doc_ids)
        o = to_bshd(o, layout)
        return [o, *torch.autograd.grad(o, leaves_c, dout.to(cast))]

    ref64 = reference(torch.float64)
    names = ["out"] + [f"grad{i}" for i in range(len(leaves))]
    if dtype == torch.float32:
        for n, x, r in zip(names, ours, ref64):
            assert rel_err(x, r) < 1e-4, (n, rel_err(x, r))
        return
    ref_same = reference(dtype)
    for n, x, r, rs in zip(names, ours, ref64, ref_same):
        ours_err, torch_err = rel_err(x, r), rel_err(rs, r)
        assert ours_err <= 2 * torch_err + 1e-3, (n, ours_err, torch_err)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # rows of the NaN documents
@pytest.mark.parametrize("causal", [False, True])
def test_other_documents_are_skipped(causal: bool) -> None:
    """NaN in the K/V (and Q) of documents 0 and 2 must not reach document 1: their blocks are
    never loaded (a loaded-then-masked NaN would poison the row)."""
    n0, n1, n2 = 2 * ALIGN, ALIGN, 2 * ALIGN
    s, h, d = n0 + n1 + n2, 2, 64
    dtype, tol = (torch.float16, 5e-3) if CUDA else (torch.float32, 1e-4)  # see GPU_FP32_CASES
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(s, 1, h, d, generator=gen).to(dtype) for _ in range(3))
    for t in (q, k, v):
        t[:n0] = float("nan")
        t[n0 + n1 :] = float("nan")
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    doc_ids = doc_ids_from_lengths([[n0, n1, n2]]).to(DEVICE)
    out = flash_attn_triton(q, k, v, causal=causal, doc_ids=doc_ids)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    mid = slice(n0, n0 + n1)
    sub = [t.detach()[mid].double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*(t.transpose(0, 1) for t in sub), causal, None).transpose(0, 1)
    ref_grads = torch.autograd.grad(ref, sub, dout[mid].double())
    for x, r in zip([out, *grads], [ref, *ref_grads]):
        assert torch.isfinite(x[mid]).all()
        assert rel_err(x[mid], r) < tol


def test_unsupported_head_dim_falls_back_to_sdpa(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fa, "_warned", set())
    gen = torch.Generator().manual_seed(11)
    s, b, hq, hkv, d = 21, 2, 4, 2, 40
    q = torch.randn(s, b, hq, d, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    k = torch.randn(s, b, hkv, d, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    v = torch.randn(s, b, hkv, d, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    doc_ids = doc_ids_from_lengths([[10, 11], [21]]).to(DEVICE)
    with caplog.at_level(logging.WARNING, logger="megatron.ops.flash_attn_triton"):
        out = flash_attn_triton(q, k, v, causal=True, doc_ids=doc_ids, softmax_scale=0.3)
        flash_attn_triton(q, k, v, causal=True, doc_ids=doc_ids, softmax_scale=0.3)
    assert sum("head dim 40" in r.getMessage() for r in caplog.records) == 1
    ref = naive_attention(*(t.transpose(0, 1) for t in (q, k, v)), True, doc_ids, 0.3)
    assert rel_err(out, ref.transpose(0, 1)) < 1e-10
    out.sum().backward()
    assert q.grad is not None and k.grad.shape == k.shape


def test_bad_arguments_raise_one_line_errors() -> None:
    q = torch.zeros(8, 1, 4, 64, device=DEVICE)
    k = torch.zeros(8, 1, 3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="kv heads must divide q heads"):
        flash_attn_triton(q, k, k)
    with pytest.raises(ValueError, match="layout"):
        flash_attn_triton(q, q, q, layout="bhsd")
    with pytest.raises(ValueError, match="doc_ids"):
        flash_attn_triton(q, q, q, doc_ids=torch.zeros(1, 7, dtype=torch.int32, device=DEVICE))
