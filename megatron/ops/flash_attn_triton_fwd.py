"""Triton FlashAttention-2 forward kernel (online softmax, log-sum-exp saved for backward).

Tensors are addressed through (batch, seq, head) strides, so "sbhd" and "bshd" layouts and
non-contiguous views along the head dim work without copies; only the last dim must be dense.
Scores live in the log2 domain: ``qk_scale = softmax_scale * log2(e)`` so ``exp2`` replaces
``exp`` and the saved LSE is ``m + log2(sum(exp2(s - m)))`` of the scaled scores ``s``.

Queries and keys may differ in number (``NQ``, ``NK``) and carry their own document ids
(``DOCQ``, ``DOCK``, both non-decreasing along the sequence): query ``i`` sees key ``j`` when
their documents agree and, if ``CAUSAL``, ``j <= i + SHIFT`` (``SHIFT`` = query offset - key
offset of the block; 0 for one self-attention). ``QDS``/``QDE`` give, per query, the range
``[start, end)`` of keys of its document. A query that sees no key gets a zero output row
and LSE ``-inf``.

The key loop of a query block is split into three ranges of key blocks (see
``query_block_key_ranges``): leading masked blocks (document starts), fully visible blocks
(no mask math at all) and trailing masked blocks (causal diagonal, document ends, ragged
sequence end). Blocks outside the query block's documents are never visited.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.6's interpreter cannot use tensor loop bounds in `range` under numpy >= 2.4
# (triton-lang/triton#9171), so in the interpreter the block loops are `while` loops.
WHILE_LOOPS: tl.constexpr = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634
MASK_VALUE: tl.constexpr = tl.constexpr(-1.0e6)  # added to masked log2-scores: exp2 -> 0


AUTOTUNE_MIN_SEQ = 2048  # shorter sequences use each kernel's first (default) config
_AUTOTUNE = [True]  # set_autotune(False): every sequence uses the first config


def set_autotune(enabled: bool) -> None:
    """Whether kernels autotune from AUTOTUNE_MIN_SEQ tokens (else each shape runs the first
    config: no minutes of tuning, as ``python -m megatron.validate`` wants)."""
    _AUTOTUNE[0] = enabled


TUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "HAS_DOC", "GROUP"]
Shape = tuple[int, int, int, int]  # (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages)


def _config(shape: Shape) -> triton.Config:
    bm, bn, w, s = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def tune_args(shapes: list[Shape], fp32_shape: Shape, key=tuple(TUNE_KEY), **extra) -> dict:
    """``triton.autotune`` arguments: configs from ``shapes`` (first = default, the only one
    below AUTOTUNE_MIN_SEQ), ``fp32_shape`` alone for fp32 inputs (FMA dots, no tensor cores:
    big tiles would spill), one small fixed config in the interpreter (fast CPU tests).
    ``extra``: more ``triton.autotune`` arguments (e.g. ``reset_to_zero``)."""
    if INTERPRET:
        return {"configs": [_config((16, 16, 1, 1))], "key": list(key), **extra}

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if named_args["Q"].dtype == torch.float32:
            return [_config(fp32_shape)]
        tune = _AUTOTUNE[0] and named_args["seq_bucket"] >= AUTOTUNE_MIN_SEQ
        return configs if tune else configs[:1]

    return {
        "configs": [_config(sh) for sh in shapes],
        "key": list(key),
        "prune_configs_by": {"early_config_prune": prune},
        **extra,
    }


FWD_SHAPES = [
    (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 2),
    (128, 128, 8, 3),
]  # fmt: skip


# fmt: off
@triton.jit
def query_block_key_ranges(DS, DE, m0, NQ, NK, SHIFT, CAUSAL: tl.constexpr,
                           HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block ranges for query rows [m0, m0 + BLOCK_M).

    Returns (lo, a, b, hi): blocks [lo, a) and [b, hi) need masks, [a, b) are fully visible to
    every query row < NQ. DS/DE point at this batch row's per-query key range of its document.
    """
    m_last = tl.minimum(m0 + BLOCK_M, NQ) - 1
    if HAS_DOC:
        lo = tl.load(DS + m0)  # first key any row may see
        full_lo = tl.load(DS + m_last)  # keys from the last row's document start...
        full_hi = tl.load(DE + m0)  # ...to the first row's document end are seen by all rows
        hi = tl.load(DE + m_last)
    else:
        lo = 0
        full_lo = 0
        full_hi = NK
        hi = NK
    if CAUSAL:
        hi = tl.maximum(tl.minimum(hi, m_last + SHIFT + 1), 0)
        full_hi = tl.maximum(tl.minimum(full_hi, m0 + SHIFT + 1), 0)
    lo_blk = lo // BLOCK_N
    hi_blk = tl.cdiv(hi, BLOCK_N)
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N), lo_blk), hi_blk)
    b = tl.minimum(tl.maximum(full_hi // BLOCK_N, a), hi_blk)
    return lo_blk, a, b, hi_blk


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, n0, offs_m, doc_q,
               DOCK_row, NK, SHIFT, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block of the online softmax: returns updated (acc, l_i, m_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = n0 + offs_n
    kT_ptrs = K_head + n0.to(tl.int64) * stride_ks + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = V_head + n0.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :]
    if MASKED:
        k_ok = offs_k < NK
        kT = tl.load(kT_ptrs, mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs, mask=k_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM != BLOCK_D:
        kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        kT = tl.load(kT_ptrs)
        v = tl.load(v_ptrs)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] fp32
    if MASKED:
        keep = k_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] + SHIFT >= offs_k[None, :])
        if HAS_DOC:
            doc_k = tl.load(DOCK_row + offs_k, mask=k_ok, other=-1)
            keep = keep & (doc_q[:, None] == doc_k[None, :])
        qk = qk * qk_scale + tl.where(keep, 0.0, MASK_VALUE)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, start, end, offs_m, doc_q,
              DOCK_row, NK, SHIFT, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Run ``_fwd_block`` over key blocks [start, end)."""
    if WHILE_LOOPS:
        n = start
        while n < end:
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs,
                                       n * BLOCK_N, offs_m, doc_q, DOCK_row, NK, SHIFT, qk_scale,
                                       MASKED, CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N,
                                       DOT_PREC)
            n += 1
    else:
        for n in range(start, end):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs,
                                       n * BLOCK_N, offs_m, doc_q, DOCK_row, NK, SHIFT, qk_scale,
                                       MASKED, CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N,
                                       DOT_PREC)
    return acc, l_i, m_i


@triton.autotune(**tune_args(FWD_SHAPES, fp32_shape=(64, 32, 4, 2)))
@triton.jit
def flash_fwd_kernel(Q, K, V, OUT, LSE, DOCQ, DOCK, QDS, QDE,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     NQ, NK, H, SHIFT, qk_scale, seq_bucket,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: (query blocks, batch * q heads). OUT is written in the layout its strides describe;
    LSE is [batch, q heads, NQ] fp32 (log2 domain; -inf where a query sees no key). DOCQ, QDS,
    QDE: [batch, NQ] int32 doc id and key range of each query; DOCK: [batch, NK] doc id of each
    key (dummies unless HAS_DOC)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first
    bh = tl.program_id(1)
    off_b = bh // H
    off_h = bh % H
    b64 = off_b.to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < NQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b64 * stride_qb + off_h.to(tl.int64) * stride_qh + rows * stride_qs
                + offs_d[None, :], mask=mask, other=0.0)
    K_head = K + b64 * stride_kb + (off_h // GROUP).to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + (off_h // GROUP).to(tl.int64) * stride_vh
    DOCK_row = DOCK + b64 * NK
    if HAS_DOC:
        doc_q = tl.load(DOCQ + b64 * NQ + offs_m, mask=offs_m < NQ, other=-2)
    else:
        doc_q = offs_m  # unused
    lo, a, b, hi = query_block_key_ranges(QDS + b64 * NQ, QDE + b64 * NQ, m0, NQ, NK, SHIFT,
                                          CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, lo, a,
                              offs_m, doc_q, DOCK_row, NK, SHIFT, qk_scale, True, CAUSAL,
                              HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, a, b,
                              offs_m, doc_q, DOCK_row, NK, SHIFT, qk_scale, False, CAUSAL,
                              HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_vs, b, hi,
                              offs_m, doc_q, DOCK_row, NK, SHIFT, qk_scale, True, CAUSAL,
                              HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)

    # A row that saw no key: its running max stayed at -inf or near MASK_VALUE.
    empty = m_i < MASK_VALUE * 0.5
    l_i = tl.where(empty, 1.0, l_i)
    acc = tl.where(empty[:, None], 0.0, acc / l_i[:, None])
    lse = tl.where(empty, -float("inf"), m_i + tl.math.log2(l_i))
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=offs_m < NQ)
    tl.store(OUT + b64 * stride_ob + off_h.to(tl.int64) * stride_oh + rows * stride_os
             + offs_d[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
# fmt: on
