"""FlashAttention-2 in Triton: the ``--use-flash-attn-triton`` attention backend.

``flash_attn_triton(q, k, v)`` computes softmax(q k^T * scale) v with causal and/or packed
document masking (``doc_ids``), GQA/MQA (k/v with fewer heads, never repeated in memory) and
strided "sbhd"/"bshd" inputs. Kernels live in ``flash_attn_triton_fwd`` / ``_bwd``; head dims
other than 64/96/128 (or CPU tensors without the Triton interpreter) fall back to PyTorch SDPA
(per document with doc_ids: no [s, s] mask).

``flash_attn_step_forward`` / ``flash_attn_step_backward`` run the same kernels as one local
attention step (megatron.model.attention_step): queries and keys of different lengths and
positions, separate document ids, the log-sum-exp returned, and the backward from a given
(merged) output and log-sum-exp.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
import triton

from megatron.ops import contiguous_grad
from megatron.ops.flash_attn_triton_bwd import (
    bwd_dkdv_kernel,
    bwd_dq_kernel,
    bwd_preprocess_kernel,
)
from megatron.ops.flash_attn_triton_fwd import INTERPRET, LOG2E, flash_fwd_kernel

logger = logging.getLogger(__name__)
LN2 = math.log(2.0)

SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("sbhd", "bshd")
# dQ inside the dK/dV kernel (atomic fp32 adds, one pass over the scores) instead of its own
# kernel (set True to use it). Off until measured faster on the GPU
# (benchmarks/bench_attention_kernels.py runs both).
FUSED_DQ = False
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("flash_attn_triton: %s; falling back to torch SDPA (slower)", reason)


def _bsh_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, seq, head) strides of a 4-D tensor in ``layout``; the last dim is dense."""
    if layout == "sbhd":
        return t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2)


def _dense_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _doc_bounds(q_doc_ids: torch.Tensor, k_doc_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(doc_q, doc_k, q_start, q_end, k_start, k_end), int32: the doc ids of queries [b, s_q]
    and keys [b, s_k]; per query the keys [start, end) of its document, per key the queries.

    Assumes doc ids non-decreasing along s (packed sequences, and any slice of them), so
    every bound is a binary search of the other row for the token's own id (no host sync)."""
    doc_q = q_doc_ids.to(torch.int32).contiguous()
    doc_k = k_doc_ids.to(torch.int32).contiguous()
    bounds = [
        torch.searchsorted(row, ids, right=right).to(torch.int32)
        for row, ids in ((doc_k, doc_q), (doc_q, doc_k))
        for right in (False, True)
    ]
    return (doc_q, doc_k, *bounds)


def _or_dummies(docs, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``docs`` (from ``_doc_bounds``), or six unused placeholders for no documents."""
    return docs if docs is not None else (torch.empty(1, dtype=torch.int32, device=device),) * 6


def _attn_fwd(q, k, v, layout: str, causal: bool, shift: int, scale: float, docs):
    """Forward kernel: ``(out, lse)`` with out fresh and contiguous in ``layout`` and lse
    ``[b, hq, s_q]`` fp32 in the log2 domain (-inf: the query saw no key)."""
    b, s_q, hq, hkv, d = _dims(q, k, layout)
    s_k = k.shape[0] if layout == "sbhd" else k.shape[1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, s_q), dtype=torch.float32, device=q.device)
    doc_q, doc_k, q_start, q_end, _, _ = _or_dummies(docs, q.device)

    def grid(meta):
        return (triton.cdiv(s_q, meta["BLOCK_M"]), b * hq)

    flash_fwd_kernel[grid](
        q, k, v, o, lse, doc_q, doc_k, q_start, q_end,
        *_bsh_strides(q, layout), *_bsh_strides(k, layout), *_bsh_strides(v, layout),
        *_bsh_strides(o, layout),
        s_q, s_k, hq, shift, scale * LOG2E, triton.next_power_of_2(max(s_q, s_k)),
        **_constexprs(q, d, hq // hkv, causal, docs is not None),
    )  # fmt: skip
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, layout: str, causal: bool, shift: int, scale: float, docs):
    """Backward kernels from ``o`` and ``lse`` (log2 domain, +inf: no key): ``(dq, dk, dv)``.
    ``o`` may be wider than q (a merged output); dq/dk/dv come in q/k/v's dtypes."""
    b, s_q, hq, hkv, d = _dims(q, k, layout)
    s_k = k.shape[0] if layout == "sbhd" else k.shape[1]
    doc_q, doc_k, q_start, q_end, k_start, k_end = _or_dummies(docs, q.device)
    consts = _constexprs(q, d, hq // hkv, causal, docs is not None)
    delta = torch.empty_like(lse)  # [b, hq, s_q]
    pre_block = 16 if INTERPRET else 128
    bwd_preprocess_kernel[(triton.cdiv(s_q, pre_block), b * hq)](
        o, do, delta, *_bsh_strides(o, layout), *_bsh_strides(do, layout), s_q, hq,
        HEAD_DIM=d, BLOCK_D=consts["BLOCK_D"], BLOCK_M=pre_block,
    )  # fmt: skip
    fused = FUSED_DQ
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if fused:  # fp32 sums of every key block's share, scaled and cast once at the end
        dq_acc = torch.zeros((b, hq, s_q, d), dtype=torch.float32, device=q.device)
    else:
        dq_acc = torch.empty(1, dtype=torch.float32, device=q.device)
    qk_scale = scale * LOG2E
    seq_bucket = triton.next_power_of_2(max(s_q, s_k))
    strides = (
        *_bsh_strides(q, layout), *_bsh_strides(k, layout), *_bsh_strides(v, layout),
        *_bsh_strides(do, layout),
    )  # fmt: skip
    bwd_dkdv_kernel[lambda meta: (triton.cdiv(s_k, meta["BLOCK_N"]), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, dq_acc, doc_q, doc_k, k_start, k_end, *strides,
        *_bsh_strides(dk, layout), *_bsh_strides(dv, layout),
        s_q, s_k, hq, hkv, shift, qk_scale, scale, seq_bucket, FUSE_DQ=fused, **consts,
    )  # fmt: skip
    if fused:
        perm = (2, 0, 1, 3) if layout == "sbhd" else (0, 2, 1, 3)  # [b, hq, s, d] -> layout
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        with torch.profiler.record_function("flash_attn_triton_fused_dq"):  # for the validation
            dq.copy_(dq_acc.permute(*perm).mul_(scale))
        return dq, dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bwd_dq_kernel[lambda meta: (triton.cdiv(s_q, meta["BLOCK_M"]), b * hq)](
        q, k, v, do, lse, delta, dq, doc_q, doc_k, q_start, q_end, *strides,
        *_bsh_strides(dq, layout), s_q, s_k, hq, shift, qk_scale, scale, seq_bucket, **consts,
    )  # fmt: skip
    return dq, dk, dv


class FlashAttnTritonFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (q, k, v, o, lse); backward recomputes P per block."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, doc_ids, layout: str):
        q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
        docs = None if doc_ids is None else _doc_bounds(doc_ids, doc_ids)
        o, lse = _attn_fwd(q, k, v, layout, causal, 0, softmax_scale, docs)
        ctx.save_for_backward(q, k, v, o, lse, *(docs or ()))
        ctx.causal, ctx.scale, ctx.layout = causal, softmax_scale, layout
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *docs = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(
            _dense_last(do), q, k, v, o, lse, ctx.layout, ctx.causal, 0, ctx.scale, docs or None
        )
        return dq, dk, dv, None, None, None, None


def _dims(q: torch.Tensor, k: torch.Tensor, layout: str) -> tuple[int, int, int, int, int]:
    """(batch, seq, q heads, kv heads, head dim)."""
    if layout == "sbhd":
        s, b, hq, d = q.shape
    else:
        b, s, hq, d = q.shape
    return b, s, hq, k.shape[2], d


def _constexprs(q: torch.Tensor, d: int, group: int, causal: bool, has_doc: bool) -> dict:
    return {
        "GROUP": group,
        "HEAD_DIM": d,
        "BLOCK_D": triton.next_power_of_2(d),
        "CAUSAL": causal,
        "HAS_DOC": has_doc,
        # fp32 inputs: exact fp32 products (Triton's default for fp32 would be TF32);
        # fp16/bf16: default tensor-core path.
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else None,
    }


def _check_inputs(q, k, v, doc_ids, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"flash_attn_triton: layout must be one of {LAYOUTS}, got {layout!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attn_triton: q/k/v must be 4-D ({layout}), got {q.dim()}/{k.dim()}/{v.dim()}-D"
        )
    if k.shape != v.shape:
        raise ValueError(f"flash_attn_triton: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    hq, hkv = q.shape[2], k.shape[2]
    same = (q.shape[0], q.shape[1], q.shape[3]) == (k.shape[0], k.shape[1], k.shape[3])
    if not same or hq % hkv != 0:
        raise ValueError(
            f"flash_attn_triton: q {tuple(q.shape)} and k/v {tuple(k.shape)} ({layout}) must share"
            " seq, batch and head dim, and kv heads must divide q heads"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attn_triton: q/k/v dtypes differ: {q.dtype}/{k.dtype}/{v.dtype}")
    b, s = (q.shape[1], q.shape[0]) if layout == "sbhd" else (q.shape[0], q.shape[1])
    if doc_ids is not None and tuple(doc_ids.shape) != (b, s):
        raise ValueError(
            f"flash_attn_triton: doc_ids must be [batch, seq] = {[b, s]}, got {list(doc_ids.shape)}"
        )


def attention_reference(
    q,
    k,
    v,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    layout: str = "sbhd",
) -> torch.Tensor:
    """Plain SDPA with an explicit boolean mask (causal + same document); same API/semantics."""
    perm = (1, 2, 0, 3) if layout == "sbhd" else (0, 2, 1, 3)  # -> [b, h, s, d]
    q_bhsd, k_bhsd, v_bhsd = (t.permute(*perm) for t in (q, k, v))
    s = q_bhsd.shape[2]
    mask = None
    if causal:
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None, None]
    if doc_ids is not None:
        same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # [b, 1, s, s]
        mask = same_doc if mask is None else mask & same_doc
    rep = q_bhsd.shape[1] // k_bhsd.shape[1]
    if rep > 1:
        k_bhsd = k_bhsd.repeat_interleave(rep, dim=1)
        v_bhsd = v_bhsd.repeat_interleave(rep, dim=1)
    o_bhsd = F.scaled_dot_product_attention(
        q_bhsd, k_bhsd, v_bhsd, attn_mask=mask, scale=softmax_scale
    )
    if o_bhsd.is_cuda and o_bhsd.requires_grad:
        o_bhsd = contiguous_grad(o_bhsd)  # cuDNN's backward and permuted gradients
    inv = (2, 0, 1, 3) if layout == "sbhd" else (0, 2, 1, 3)
    return o_bhsd.permute(*inv).contiguous()


def _fallback(q, k, v, causal: bool, scale: float, doc_ids, layout: str) -> torch.Tensor:
    """PyTorch SDPA for what the kernels do not take, in O(s) memory: one call (its own
    causal mask), or one call per document (megatron.ops.packed_attention)."""
    from megatron.ops.packed_attention import document_loop_attention

    q_s, k_s, v_s = (t.transpose(0, 1) if layout == "bshd" else t for t in (q, k, v))  # sbhd
    if doc_ids is not None:
        out = document_loop_attention(q_s, k_s, v_s, doc_ids, softmax_scale=scale, causal=causal)
    else:
        out = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3) for t in (q_s, k_s, v_s)), is_causal=causal, scale=scale,
            enable_gqa=q.shape[2] != k.shape[2],
        ).permute(2, 0, 1, 3)  # fmt: skip
    return (out.transpose(0, 1) if layout == "bshd" else out).contiguous()


def flash_attn_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    layout: str = "sbhd",
) -> torch.Tensor:
    """Attention of q [s, b, hq, d] (or [b, s, hq, d] with layout="bshd") over k/v with hkv heads.

    doc_ids: optional [b, s] non-decreasing per-token document ids; queries attend only to keys
    of their own document. Returns a fresh contiguous tensor shaped like q; differentiable.
    """
    _check_inputs(q, k, v, doc_ids, layout)
    d = q.shape[3]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    reason = None
    if d not in SUPPORTED_HEAD_DIMS:
        reason = f"head dim {d} not in {SUPPORTED_HEAD_DIMS}"
    elif q.dtype not in SUPPORTED_DTYPES:
        reason = f"dtype {q.dtype} not supported"
    elif q.device.type != "cuda" and not INTERPRET:
        reason = f"{q.device.type} tensors need CUDA (or TRITON_INTERPRET=1)"
    if reason is not None:
        _warn_once(reason)
        return _fallback(q, k, v, causal, softmax_scale, doc_ids, layout)
    return FlashAttnTritonFunction.apply(q, k, v, causal, float(softmax_scale), doc_ids, layout)


def step_unsupported(q: torch.Tensor) -> str | None:
    """Why the kernels cannot run a step on ``q`` (then the caller's fallback), or None."""
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} not in {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not supported"
    if q.device.type != "cuda" and not INTERPRET:
        return f"{q.device.type} tensors need CUDA (or TRITON_INTERPRET=1)"
    return None


def flash_attn_step_forward(
    q_sbhd: torch.Tensor,
    k_sbhd: torch.Tensor,
    v_sbhd: torch.Tensor,
    *,
    causal: bool,
    shift: int,
    softmax_scale: float,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of queries ``[s_q, b, hq, d]`` against keys ``[s_k, b, hkv, d]``: ``(out,
    lse)``, lse ``[b, hq, s_q]`` fp32, natural log, -inf (and a zero row) where a query sees no
    key. ``causal``: key j visible to query i only when ``j <= i + shift``. Doc ids ``[b, s]``,
    non-decreasing along s, both or neither. No autograd (megatron.model.attention_step)."""
    q, k, v = (_dense_last(t) for t in (q_sbhd, k_sbhd, v_sbhd))
    docs = None if q_doc_ids is None else _doc_bounds(q_doc_ids, k_doc_ids)
    out, lse2 = _attn_fwd(q, k, v, "sbhd", causal, int(shift), float(softmax_scale), docs)
    return out, lse2.mul_(LN2)


def flash_attn_step_backward(
    dout_sbhd: torch.Tensor,
    q_sbhd: torch.Tensor,
    k_sbhd: torch.Tensor,
    v_sbhd: torch.Tensor,
    out_sbhd: torch.Tensor,
    lse_bhs: torch.Tensor,
    *,
    causal: bool,
    shift: int,
    softmax_scale: float,
    q_doc_ids: torch.Tensor | None = None,
    k_doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq, dk, dv)`` from the given (merged) ``out`` and natural-log ``lse``
    (FlashAttention's backward: P from lse, delta = rowsum(dout * out))."""
    q, k, v = (_dense_last(t) for t in (q_sbhd, k_sbhd, v_sbhd))
    dout = _dense_last(dout_sbhd.to(q.dtype))
    docs = None if q_doc_ids is None else _doc_bounds(q_doc_ids, k_doc_ids)
    lse2 = lse_bhs.to(torch.float32) * LOG2E
    lse2 = torch.where(torch.isneginf(lse2), torch.inf, lse2).contiguous()  # no key: P = 0
    return _attn_bwd(
        dout, q, k, v, _dense_last(out_sbhd), lse2, "sbhd", causal, int(shift),
        float(softmax_scale), docs,
    )  # fmt: skip
