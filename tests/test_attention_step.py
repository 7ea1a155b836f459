"""The local attention step (megatron.model.attention_step) against one full attention.

A causal sequence cut into query and key chunks, one step per (query chunk, key chunk) with
its offsets, merged by log-sum-exp, equals one full-sequence attention in float64; the
backward of every block from the merged output and log-sum-exp, summed, equals autograd
through the full attention: with GQA, packed documents, chunks that do not line up with
the diagonal, and the SDPA step's fused CPU kernel as well as the classic reference.
"""

from __future__ import annotations

import pytest
import torch

from megatron.model.attention_backends import build_local_attention
from megatron.model.attention_step import (
    CLASSIC_STEP,
    SDPA_STEP,
    ClassicStep,
    SDPAStep,
    TritonStep,
    merge,
)

S, B, HQ, D, SCALE = 48, 2, 4, 8, 0.3
DOCS = torch.tensor([[0] * 10 + [1] * 23 + [2] * 15, [5] * 48])  # [b, s]


def _reference(q_sbhd, k_sbhd, v_sbhd, doc_ids):
    """Full causal attention by autograd-able float64 math (K/V repeated for GQA)."""
    s, hq = q_sbhd.shape[0], q_sbhd.shape[2]
    k, v = (t.repeat_interleave(hq // t.shape[2], dim=2) for t in (k_sbhd, v_sbhd))
    scores = torch.einsum("sbhd,tbhd->bhst", q_sbhd, k) * SCALE
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _blockwise(step, q, k, v, doc_ids, q_size: int, k_size: int, dout):
    """Steps over every chunk pair (empty ones included), merged; then every block's backward."""
    qs, ks = _chunks(S, q_size), _chunks(S, k_size)

    def kw(i, j):
        docs = {} if doc_ids is None else {"q_doc_ids": doc_ids[:, i], "k_doc_ids": doc_ids[:, j]}
        return dict(
            docs, causal="diagonal", q_offset=i.start, k_offset=j.start, softmax_scale=SCALE
        )

    outs, lses = [], []
    for i in qs:
        acc, lse = None, None
        for j in ks:
            o, l_bhs = step(q[i], k[j], v[j], **kw(i, j))
            assert o.shape == q[i].shape and l_bhs.shape == (B, HQ, i.stop - i.start)
            acc, lse = (o, l_bhs) if acc is None else merge(acc, lse, o, l_bhs)
        outs.append(acc)
        lses.append(lse)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for i, out_i, lse_i in zip(qs, outs, lses):
        for j in ks:
            dq, dk, dv = step.backward(dout[i], q[i], k[j], v[j], out_i, lse_i, **kw(i, j))
            grads[0][i] += dq
            grads[1][j] += dk
            grads[2][j] += dv
    return torch.cat(outs), grads


@pytest.mark.parametrize("step", [CLASSIC_STEP, SDPA_STEP], ids=["classic", "sdpa"])
@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("q_size,k_size", [(16, 16), (12, 16), (48, 48)])
def test_chunked_steps_merged_equal_full_attention(step, hkv, docs, q_size, k_size):
    g = torch.Generator().manual_seed(hkv * 10 + q_size)
    q = torch.randn(S, B, HQ, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(S, B, hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in "kv"
    )
    dout = torch.randn(S, B, HQ, D, generator=g, dtype=torch.float64)
    doc_ids = DOCS if docs else None
    ref = _reference(q, k, v, doc_ids)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    out, grads = _blockwise(step, q.detach(), k.detach(), v.detach(), doc_ids, q_size, k_size, dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sdpa_step_runs_the_kernel_where_it_can():
    """Aligned square diagonal blocks and unmasked blocks run the fused kernel; documents and
    diagonal blocks that are not square with equal offsets fall back to the classic step."""
    q = torch.zeros(16, 1, 2, 8)
    k = torch.zeros(8, 1, 2, 8)
    takes = SDPAStep.kernel_takes
    assert takes(q, q, _blk(masked=True))
    assert takes(q, k, _blk(masked=False, q_offset=16))
    assert not takes(q, k, _blk(masked=True, q_offset=8, k_offset=16))
    assert not takes(q, q, _blk(masked=True, q_offset=8, k_offset=0))
    assert not takes(q, q, _blk(masked=False, docs=torch.zeros(1, 16)))


def _blk(masked: bool, q_offset: int = 0, k_offset: int = 0, docs=None):
    from megatron.model.attention_step import Block

    return Block(docs, docs, masked, q_offset, k_offset, SCALE)


def test_lse_is_the_natural_log_sum_exp_and_empty_blocks_are_minus_inf():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8, 1, 2, 4, generator=g, dtype=torch.float64) for _ in "qkv")
    for step in (CLASSIC_STEP, SDPA_STEP):
        out, lse = step(q, k, v, softmax_scale=SCALE)
        want = torch.logsumexp(torch.einsum("sbhd,tbhd->bhst", q, k) * SCALE, dim=-1)
        torch.testing.assert_close(lse, want, rtol=0, atol=1e-12)
        # Keys entirely after the queries: an empty block, and merging it changes nothing.
        out_e, lse_e = step(q, k, v, causal="diagonal", k_offset=8, softmax_scale=SCALE)
        assert (out_e == 0).all() and torch.isneginf(lse_e).all()
        merged, merged_lse = merge(out, lse, out_e, lse_e)
        assert torch.equal(merged, out) and torch.equal(merged_lse, lse)
    both, both_lse = merge(out_e, lse_e, out_e, lse_e)  # nothing seen on either side: no NaN
    assert (both == 0).all() and torch.isneginf(both_lse).all()


def test_in_place_merge_equals_merge_on_views_with_bf16_blocks():
    from megatron.model.attention_step import merge_

    g = torch.Generator().manual_seed(5)
    out = torch.randn(8, 1, 2, 4, generator=g)
    lse = torch.randn(1, 2, 8, generator=g)
    lse[..., :2] = float("-inf")  # rows nothing has seen yet
    out[:2] = 0
    out_b = torch.randn(4, 1, 2, 4, generator=g).bfloat16()
    lse_b = torch.randn(1, 2, 4, generator=g)
    lse_b[..., 0] = float("-inf")  # ... and one that block b does not see either
    rows = slice(0, 4)  # block b covers the first half of the rows (views, as the ring merges)
    want_out, want_lse = merge(out[rows], lse[..., rows], out_b, lse_b)
    got_out, got_lse = merge_(out[rows], lse[..., rows], out_b, lse_b)
    assert got_out.data_ptr() == out.data_ptr()  # written into the accumulator
    torch.testing.assert_close(out[rows], want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[..., rows], want_lse, rtol=0, atol=0)
    assert not out.isnan().any() and (out[0] == 0).all()


def test_triton_merge_equals_merge_on_strided_views():
    """The one-pass Triton merge (Triton interpreter on CPU) against the reference merge:
    accumulator views, a block output laid out [b, h, s, d] as cuDNN returns it, rows that
    neither block sees."""
    from megatron.ops.lse_merge_triton import merge_into

    g = torch.Generator().manual_seed(7)
    out = torch.randn(10, 2, 3, 8, generator=g)
    lse = torch.randn(2, 3, 10, generator=g)
    lse[..., :3] = float("-inf")
    out[:3] = 0
    out_b = torch.randn(2, 3, 5, 8, generator=g).bfloat16().permute(2, 0, 1, 3)  # [s, b, h, d]
    lse_b = torch.randn(2, 3, 5, generator=g)
    lse_b[..., 0] = float("-inf")
    lse_b[0, 1, 3] = float("-inf")
    rows = slice(1, 6)
    want_out, want_lse = merge(out[rows], lse[..., rows], out_b, lse_b)
    merge_into(out[rows], lse[..., rows], out_b, lse_b)
    torch.testing.assert_close(out[rows], want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[..., rows], want_lse, rtol=1e-6, atol=1e-6)
    assert not out.isnan().any() and (out[:2] == 0).all()  # row 1: seen by neither block
    assert torch.isneginf(lse[..., :2]).all()


def test_float32_inputs_give_float32_lse_and_reject_bad_arguments():
    q = torch.randn(8, 1, 2, 4)
    out, lse = SDPA_STEP(q, q, q, causal="diagonal", softmax_scale=SCALE)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="causal"):
        CLASSIC_STEP(q, q, q, causal="full", softmax_scale=SCALE)
    with pytest.raises(ValueError, match="both or neither"):
        CLASSIC_STEP(q, q, q, q_doc_ids=torch.zeros(1, 8), softmax_scale=SCALE)


def test_every_backend_exposes_a_step():
    for name, kind in (("classic", ClassicStep), ("sdpa", SDPAStep), ("triton", TritonStep)):
        attn = build_local_attention(name, attention_dropout=0.0, softmax_scale=SCALE)
        assert isinstance(attn.step, kind)
