"""Triton FlashAttention-2 backward kernels (FA2 split by default: no atomics, deterministic).

1. ``bwd_preprocess_kernel``: delta = rowsum(dO * O)   # [b, hq, NQ] fp32
2. ``bwd_dkdv_kernel``: one program per (key block, batch, kv head) keeps dK/dV of its key block
   in fp32 registers and iterates over the query heads of its GQA group and over the query
   blocks that can see the key block, recomputing P from the saved LSE. With ``FUSE_DQ`` it
   also adds each query block's dQ share into an fp32 buffer with atomic adds (one pass over
   the scores instead of two; the order of the adds, hence dQ's rounding, varies run to run).
3. ``bwd_dq_kernel`` (without ``FUSE_DQ``): one program per (query block, batch, q head)
   iterates over key blocks.

Queries and keys follow the forward's conventions (``flash_attn_triton_fwd``): ``NQ``/``NK``
tokens, own document ids, causal ``j <= i + SHIFT``; ``KDS``/``KDE`` give, per key, the range
of queries of its document. Rows whose LSE is +inf get P = 0 (the caller maps "saw no key",
LSE -inf, to +inf). Both main kernels split their loops into masked and fully visible blocks
like the forward (``query_block_key_ranges`` / ``key_block_query_ranges``) and skip blocks of
other documents.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megatron.ops.flash_attn_triton_fwd import (
    TUNE_KEY,
    WHILE_LOOPS,
    query_block_key_ranges,
    tune_args,
)

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages), default first
DKDV_SHAPES = [
    (64, 128, 8, 4), (64, 128, 8, 3), (32, 128, 4, 2), (64, 128, 4, 2), (64, 128, 8, 2),
    (32, 128, 8, 3),
]  # fmt: skip
DQ_SHAPES = [
    (128, 64, 8, 3), (128, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3),
    (128, 128, 8, 2), (128, 64, 8, 4),
]  # fmt: skip


# fmt: off
@triton.jit
def bwd_preprocess_kernel(OUT, DO, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds,
                          stride_dh, N, H, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """Grid: (query blocks, batch * q heads); DELTA is [batch, q heads, N] fp32."""
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + rows * stride_os + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + rows * stride_ds + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def key_block_query_ranges(DS, DE, n0, NQ, NK, SHIFT, CAUSAL: tl.constexpr,
                           HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block ranges for key columns [n0, n0 + BLOCK_N): (lo, a, b, hi) with [a, b) the
    query blocks whose rows all see every key < NK of the block; mirror of the forward helper."""
    n_last = tl.minimum(n0 + BLOCK_N, NK) - 1
    if HAS_DOC:
        lo = tl.load(DS + n0)
        full_lo = tl.load(DS + n_last)
        full_hi = tl.load(DE + n0)
        hi = tl.load(DE + n_last)
    else:
        lo = 0
        full_lo = 0
        full_hi = NQ
        hi = NQ
    if CAUSAL:
        lo = tl.maximum(lo, n0 - SHIFT)
        full_lo = tl.maximum(full_lo, n_last - SHIFT)
    lo_blk = lo // BLOCK_M
    hi_blk = tl.cdiv(hi, BLOCK_M)
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_M), lo_blk), hi_blk)
    b = tl.minimum(tl.maximum(full_hi // BLOCK_M, a), hi_blk)
    return lo_blk, a, b, hi_blk


@triton.jit
def _dkdv_block(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head, DELTA_head, DQ_head,
                DOCQ_row, stride_qs, stride_dos, m0, NQ, SHIFT, qk_scale, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, FUSE_DQ: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """Add one query block's contribution to dK, dV (fp32, [BLOCK_N, BLOCK_D]); with FUSE_DQ
    also its dQ share (unscaled) to DQ_head ([NQ, HEAD_DIM] fp32) by atomic adds."""
    offs_i = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_i
    offs_d = tl.arange(0, BLOCK_D)
    qT_ptrs = Q_head + m0.to(tl.int64) * stride_qs + offs_i[None, :] * stride_qs + offs_d[:, None]
    do_ptrs = DO_head + m0.to(tl.int64) * stride_dos + offs_i[:, None] * stride_dos + offs_d[None, :]
    q_ok = offs_m < NQ
    if MASKED:
        qT = tl.load(qT_ptrs, mask=q_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        do = tl.load(do_ptrs, mask=q_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        lse = tl.load(LSE_head + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(DELTA_head + offs_m, mask=q_ok, other=0.0)
    else:
        if HEAD_DIM != BLOCK_D:
            qT = tl.load(qT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            qT = tl.load(qT_ptrs)
            do = tl.load(do_ptrs)
        lse = tl.load(LSE_head + offs_m)
        delta = tl.load(DELTA_head + offs_m)
    qkT = tl.dot(k, qT, input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASKED:
        keep = q_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[None, :] + SHIFT >= offs_n[:, None])
        if HAS_DOC:
            doc_q = tl.load(DOCQ_row + offs_m, mask=q_ok, other=-2)
            keep = keep & (doc_k[:, None] == doc_q[None, :])
        pT = tl.where(keep, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    if FUSE_DQ:
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_D]
        dq_ptrs = DQ_head + offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.atomic_add(dq_ptrs, dq, mask=q_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                      sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_loop(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head, DELTA_head, DQ_head,
               DOCQ_row, stride_qs, stride_dos, start, end, NQ, SHIFT, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr,
               FUSE_DQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """Run ``_dkdv_block`` over query blocks [start, end)."""
    if WHILE_LOOPS:
        m = start
        while m < end:
            dk, dv = _dkdv_block(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head,
                                 DELTA_head, DQ_head, DOCQ_row, stride_qs, stride_dos,
                                 m * BLOCK_M, NQ, SHIFT, qk_scale, MASKED, CAUSAL, HAS_DOC,
                                 FUSE_DQ, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC)
            m += 1
    else:
        for m in range(start, end):
            dk, dv = _dkdv_block(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head,
                                 DELTA_head, DQ_head, DOCQ_row, stride_qs, stride_dos,
                                 m * BLOCK_M, NQ, SHIFT, qk_scale, MASKED, CAUSAL, HAS_DOC,
                                 FUSE_DQ, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC)
    return dk, dv


# The fused-dQ variant adds into DQ: autotuning's trial runs start from zeros each time.
@triton.autotune(**tune_args(DKDV_SHAPES, fp32_shape=(32, 64, 4, 2),
                             key=(*TUNE_KEY, "FUSE_DQ"), reset_to_zero=["DQ"]))
@triton.jit
def bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, DOCQ, DOCK, KDS, KDE,
                    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                    NQ, NK, HQ, HKV, SHIFT, qk_scale, sm_scale, seq_bucket,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
                    FUSE_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: (key blocks, batch * kv heads). Writes dK, dV of one key block summed over the
    GROUP query heads sharing its kv head, so no cross-program reduction is needed. DQ: with
    FUSE_DQ, [batch, q heads, NQ, HEAD_DIM] fp32 zeros that receive the unscaled dQ."""
    bh = tl.program_id(1)
    b64 = (bh // HKV).to(tl.int64)
    kv64 = (bh % HKV).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < NK)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b64 * stride_kb + kv64 * stride_kh + rows * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + kv64 * stride_vh + rows * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    DOCQ_row = DOCQ + b64 * NQ
    if HAS_DOC:
        doc_k = tl.load(DOCK + b64 * NK + offs_n, mask=offs_n < NK, other=-1)
    else:
        doc_k = offs_n  # unused
    lo, a, b, hi = key_block_query_ranges(KDS + b64 * NK, KDE + b64 * NK, n0, NQ, NK, SHIFT,
                                          CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in tl.static_range(GROUP):
        h64 = kv64 * GROUP + g
        Q_head = Q + b64 * stride_qb + h64 * stride_qh
        DO_head = DO + b64 * stride_dob + h64 * stride_doh
        LSE_head = LSE + (b64 * HQ + h64) * NQ
        DELTA_head = DELTA + (b64 * HQ + h64) * NQ
        DQ_head = DQ + (b64 * HQ + h64) * NQ * HEAD_DIM
        dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head, DELTA_head,
                            DQ_head, DOCQ_row, stride_qs, stride_dos, lo, a, NQ, SHIFT,
                            qk_scale, True, CAUSAL, HAS_DOC, FUSE_DQ, HEAD_DIM, BLOCK_D,
                            BLOCK_M, DOT_PREC)
        dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head, DELTA_head,
                            DQ_head, DOCQ_row, stride_qs, stride_dos, a, b, NQ, SHIFT,
                            qk_scale, False, CAUSAL, HAS_DOC, FUSE_DQ, HEAD_DIM, BLOCK_D,
                            BLOCK_M, DOT_PREC)
        dk, dv = _dkdv_loop(dk, dv, k, v, offs_n, doc_k, Q_head, DO_head, LSE_head, DELTA_head,
                            DQ_head, DOCQ_row, stride_qs, stride_dos, b, hi, NQ, SHIFT,
                            qk_scale, True, CAUSAL, HAS_DOC, FUSE_DQ, HEAD_DIM, BLOCK_D,
                            BLOCK_M, DOT_PREC)

    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + kv64 * stride_dkh + rows * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + kv64 * stride_dvh + rows * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row, stride_ks,
              stride_vs, n0, NK, SHIFT, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Add one key block's contribution to dQ (fp32, [BLOCK_M, BLOCK_D])."""
    offs_j = tl.arange(0, BLOCK_N)
    offs_k = n0 + offs_j
    offs_d = tl.arange(0, BLOCK_D)
    kT_ptrs = K_head + n0.to(tl.int64) * stride_ks + offs_j[None, :] * stride_ks + offs_d[:, None]
    vT_ptrs = V_head + n0.to(tl.int64) * stride_vs + offs_j[None, :] * stride_vs + offs_d[:, None]
    if MASKED:
        k_ok = offs_k < NK
        kT = tl.load(kT_ptrs, mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
        vT = tl.load(vT_ptrs, mask=k_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    elif HEAD_DIM != BLOCK_D:
        kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        vT = tl.load(vT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        kT = tl.load(kT_ptrs)
        vT = tl.load(vT_ptrs)
    qk = tl.dot(q, kT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        keep = k_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] + SHIFT >= offs_k[None, :])
        if HAS_DOC:
            doc_k = tl.load(DOCK_row + offs_k, mask=k_ok, other=-1)
            keep = keep & (doc_q[:, None] == doc_k[None, :])
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, vT, input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _dq_loop(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row, stride_ks,
             stride_vs, start, end, NK, SHIFT, qk_scale, MASKED: tl.constexpr,
             CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Run ``_dq_block`` over key blocks [start, end)."""
    if WHILE_LOOPS:
        n = start
        while n < end:
            dq = _dq_block(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row,
                           stride_ks, stride_vs, n * BLOCK_N, NK, SHIFT, qk_scale, MASKED,
                           CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
            n += 1
    else:
        for n in range(start, end):
            dq = _dq_block(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row,
                           stride_ks, stride_vs, n * BLOCK_N, NK, SHIFT, qk_scale, MASKED,
                           CAUSAL, HAS_DOC, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
    return dq


@triton.autotune(**tune_args(DQ_SHAPES, fp32_shape=(64, 32, 4, 2)))
@triton.jit
def bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOCQ, DOCK, QDS, QDE,
                  stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                  stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                  stride_dqb, stride_dqs, stride_dqh,
                  NQ, NK, HQ, SHIFT, qk_scale, sm_scale, seq_bucket,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid: (query blocks, batch * q heads)."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first
    bh = tl.program_id(1)
    b64 = (bh // HQ).to(tl.int64)
    h64 = (bh % HQ).to(tl.int64)
    kv64 = h64 // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qs + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dos + offs_d[None, :],
                 mask=mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=0.0)
    DOCK_row = DOCK + b64 * NK
    if HAS_DOC:
        doc_q = tl.load(DOCQ + b64 * NQ + offs_m, mask=row_ok, other=-2)
    else:
        doc_q = offs_m  # unused
    lo, a, b, hi = query_block_key_ranges(QDS + b64 * NQ, QDE + b64 * NQ, m0, NQ, NK, SHIFT,
                                          CAUSAL, HAS_DOC, BLOCK_M, BLOCK_N)
    K_head = K + b64 * stride_kb + kv64 * stride_kh
    V_head = V + b64 * stride_vb + kv64 * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row, stride_ks,
                  stride_vs, lo, a, NK, SHIFT, qk_scale, True, CAUSAL, HAS_DOC, HEAD_DIM,
                  BLOCK_D, BLOCK_N, DOT_PREC)
    dq = _dq_loop(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row, stride_ks,
                  stride_vs, a, b, NK, SHIFT, qk_scale, False, CAUSAL, HAS_DOC, HEAD_DIM,
                  BLOCK_D, BLOCK_N, DOT_PREC)
    dq = _dq_loop(dq, q, do, lse, delta, offs_m, doc_q, K_head, V_head, DOCK_row, stride_ks,
                  stride_vs, b, hi, NK, SHIFT, qk_scale, True, CAUSAL, HAS_DOC, HEAD_DIM,
                  BLOCK_D, BLOCK_N, DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)
# fmt: on
