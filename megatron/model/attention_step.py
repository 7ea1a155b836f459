"""The local attention step: one block of queries against one block of keys, and its merge.

Blockwise attention (``megatron.model.blockwise_attention``) and ring attention (K/V blocks
from other ranks) both compute attention as a sum over key blocks: a step per block returns
that block's output and log-sum-exp, ``merge`` combines them, and the backward of every block
runs from the final (merged) output and log-sum-exp, as FlashAttention's backward does.

Contract of ``AttentionStep`` (every local attention backend exposes one as ``attn.step``)::

    out_sbhd, lse_bhs = step(q_sbhd, k_sbhd, v_sbhd, q_doc_ids=None, k_doc_ids=None,
                             causal="none" | "diagonal", q_offset=0, k_offset=0,
                             softmax_scale=...)
    dq_sbhd, dk_sbhd, dv_sbhd = step.backward(dout_sbhd, q_sbhd, k_sbhd, v_sbhd,
                                              out_sbhd, lse_bhs, <the same keywords>)

* Shapes, sequence first like the rest of the model: q ``[s_q, b, hq, d]``, k/v
  ``[s_k, b, hkv, d]`` with ``hkv`` dividing ``hq`` (GQA: K/V are not repeated in memory
  where the kernel allows); any strides. ``out`` is ``[s_q, b, hq, d]`` in q's dtype;
  ``lse`` is ``[b, hq, s_q]``, the natural-log log-sum-exp of the scaled, masked scores, in
  float32 (float64 for float64 inputs); ``-inf`` for a query that sees no key of the block
  (its ``out`` row is then zero). Gradients come back in the inputs' shapes and dtypes.
* Positions: query ``i`` of the block is at global position ``q_offset + i``, key ``j`` at
  ``k_offset + j``. ``causal="none"``: every key is visible. ``causal="diagonal"``: a query
  sees the keys at global positions ``<=`` its own (for a square block with equal offsets,
  plain causal attention; a block entirely below the diagonal is unmasked, one entirely
  above it is empty and costs no kernel call).
* Documents (packed sequences): ``q_doc_ids`` ``[b, s_q]`` and ``k_doc_ids`` ``[b, s_k]``,
  both or neither; a query sees a key only when their ids are equal.
* Backward from the merged result: ``out`` and ``lse`` given to ``backward`` are the FINAL
  ones, merged over all key blocks. With ``P = exp(scale * q k^T - lse)`` recomputed from the
  merged ``lse`` and ``delta = rowsum(dout * out)``: ``dV = P^T dout``, ``dS = P * (dout v^T
  - delta)``, ``dQ = scale * dS k``, ``dK = scale * dS^T q``: this block's share of the
  gradients of the whole attention. Summing dQ over key blocks and dK/dV over query blocks
  gives the full gradients.
* No dropout; the forward and backward build no autograd graph (call them from an
  ``autograd.Function``, as blockwise attention does).

``merge(out_a, lse_a, out_b, lse_b)`` combines two blocks' results over disjoint keys, in
float32 (or wider); cast the final output to the model's dtype. ``ClassicStep`` is the
reference (fp32 matmul + softmax with an explicit mask); ``SDPAStep`` runs the fused kernels
that return the log-sum-exp (cuDNN on CUDA, the flash kernel on CPU) and hands what they
cannot take to the Triton step on CUDA (the classic step on CPU); ``TritonStep`` runs this
project's Triton kernels, which take every case (documents, offsets, GQA) in one call. A new
kernel plugs in by subclassing ``AttentionStep`` and implementing ``_forward`` and
``_backward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Causal = Literal["none", "diagonal"]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp's (and the merge's) dtype for inputs of ``dtype``: float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def merge(out_a_sbhd: Tensor, lse_a_bhs: Tensor, out_b_sbhd: Tensor, lse_b_bhs: Tensor):
    """Attention over the keys of two blocks from each block's ``(out, lse)``, by log-sum-exp.

    Returns ``(out [s, b, h, d], lse [b, h, s])``. Rows whose ``lse`` is ``-inf`` on both
    sides stay zero with ``lse = -inf`` (no NaN).
    """
    lse_bhs = torch.logaddexp(lse_a_bhs, lse_b_bhs)
    finite_bhs = torch.where(torch.isneginf(lse_bhs), 0.0, lse_bhs)

    def weight(lse_x_bhs: Tensor) -> Tensor:  # [b, h, s] -> [s, b, h, 1]
        return torch.exp(lse_x_bhs - finite_bhs).permute(2, 0, 1)[..., None]

    return out_a_sbhd * weight(lse_a_bhs) + out_b_sbhd * weight(lse_b_bhs), lse_bhs


def merge_(out_a_sbhd: Tensor, lse_a_bhs: Tensor, out_b_sbhd: Tensor, lse_b_bhs: Tensor):
    """:func:`merge` written into block a's ``out`` and ``lse`` (views of an accumulator that
    the caller owns); on CUDA one Triton pass that reads and writes each accumulator row once
    (``megatron.ops.lse_merge_triton``), elsewhere :func:`merge` copied in. Returns them."""
    if _triton_merge_takes(out_a_sbhd, lse_a_bhs, out_b_sbhd, lse_b_bhs):
        from megatron.ops.lse_merge_triton import merge_into  # imports triton: lazily

        return merge_into(out_a_sbhd, lse_a_bhs, out_b_sbhd, lse_b_bhs)
    out_sbhd, lse_bhs = merge(out_a_sbhd, lse_a_bhs, out_b_sbhd, lse_b_bhs)
    return out_a_sbhd.copy_(out_sbhd), lse_a_bhs.copy_(lse_bhs)


def _triton_merge_takes(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> bool:
    return (
        out_a.is_cuda
        and out_a.dtype == lse_a.dtype == lse_b.dtype == torch.float32
        and out_a.stride(3) == 1
        and out_b.stride(3) == 1
    )


@dataclass(frozen=True)
class Block:
    """What a backend's step sees of the keywords: documents, mask, positions, scale."""

    q_doc_ids: Tensor | None  # [b, s_q]
    k_doc_ids: Tensor | None  # [b, s_k]
    masked: bool  # the causal mask applies (False: causal="none", or at/below the diagonal)
    q_offset: int
    k_offset: int
    scale: float


def _block(q_sbhd: Tensor, k_sbhd: Tensor, q_doc_ids, k_doc_ids, causal, q_off, k_off, scale):
    """The step's ``Block``, or None when no query of the block sees any key."""
    if causal not in ("none", "diagonal"):
        raise ValueError(f"causal must be 'none' or 'diagonal', not {causal!r}")
    if (q_doc_ids is None) != (k_doc_ids is None):
        raise ValueError("q_doc_ids and k_doc_ids go together: give both or neither")
    s_q, s_k = q_sbhd.shape[0], k_sbhd.shape[0]
    if causal == "diagonal" and k_off > q_off + s_q - 1:  # entirely above the diagonal
        return None
    masked = causal == "diagonal" and k_off + s_k - 1 > q_off
    return Block(q_doc_ids, k_doc_ids, masked, q_off, k_off, scale)


class AttentionStep:
    """One block's attention and its backward from the merged result (module docstring)."""

    def __call__(
        self,
        q_sbhd: Tensor,
        k_sbhd: Tensor,
        v_sbhd: Tensor,
        *,
        q_doc_ids: Tensor | None = None,
        k_doc_ids: Tensor | None = None,
        causal: Causal = "none",
        q_offset: int = 0,
        k_offset: int = 0,
        softmax_scale: float,
    ) -> tuple[Tensor, Tensor]:
        """``(out [s_q, b, hq, d], lse [b, hq, s_q])`` of this block."""
        blk = _block(
            q_sbhd, k_sbhd, q_doc_ids, k_doc_ids, causal, q_offset, k_offset, softmax_scale
        )
        with torch.no_grad():
            if blk is not None:
                return self._forward(q_sbhd, k_sbhd, v_sbhd, blk)
            s_q, b, hq, _ = q_sbhd.shape  # an empty block: zero output, lse -inf
            lse_bhs = q_sbhd.new_full((b, hq, s_q), -torch.inf, dtype=lse_dtype(q_sbhd.dtype))
            return torch.zeros_like(q_sbhd), lse_bhs

    forward = __call__

    def backward(
        self,
        dout_sbhd: Tensor,
        q_sbhd: Tensor,
        k_sbhd: Tensor,
        v_sbhd: Tensor,
        out_sbhd: Tensor,
        lse_bhs: Tensor,
        *,
        q_doc_ids: Tensor | None = None,
        k_doc_ids: Tensor | None = None,
        causal: Causal = "none",
        q_offset: int = 0,
        k_offset: int = 0,
        softmax_scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This block's ``(dq, dk, dv)`` given the MERGED ``out`` and ``lse``."""
        blk = _block(
            q_sbhd, k_sbhd, q_doc_ids, k_doc_ids, causal, q_offset, k_offset, softmax_scale
        )
        with torch.no_grad():
            if blk is None:
                return tuple(torch.zeros_like(t) for t in (q_sbhd, k_sbhd, v_sbhd))
            return self._backward(dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk)

    # A backend implements these two (same shapes as the public methods).
    def _forward(self, q_sbhd, k_sbhd, v_sbhd, blk: Block) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _backward(self, dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk: Block):
        raise NotImplementedError


def _allowed(s_q: int, s_k: int, blk: Block, device: torch.device) -> Tensor | None:
    """Boolean "may attend" mask broadcastable to [b, hkv, group, s_q, s_k], or None."""
    allowed = None
    if blk.masked:
        q_pos = torch.arange(blk.q_offset, blk.q_offset + s_q, device=device)
        k_pos = torch.arange(blk.k_offset, blk.k_offset + s_k, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # [s_q, s_k]
    if blk.q_doc_ids is not None:
        same = blk.q_doc_ids[:, :, None] == blk.k_doc_ids[:, None, :]  # [b, s_q, s_k]
        same = same[:, None, None]  # [b, 1, 1, s_q, s_k]
        allowed = same if allowed is None else same & allowed
    return allowed


def _grouped(t_sbhd: Tensor, hkv: int, dtype: torch.dtype) -> Tensor:
    """[s, b, h, d] -> [b, hkv, h // hkv, s, d] (K/V: group 1, broadcast, no copies)."""
    s, b, h, d = t_sbhd.shape
    return t_sbhd.permute(1, 2, 0, 3).reshape(b, hkv, h // hkv, s, d).to(dtype)


def _ungrouped(t5: Tensor, like_sbhd: Tensor) -> Tensor:
    """[b, hkv, g, s, d] -> [s, b, hkv * g, d] in ``like_sbhd``'s dtype."""
    b, hkv, g, s, d = t5.shape
    return t5.reshape(b, hkv * g, s, d).permute(2, 0, 1, 3).to(like_sbhd.dtype)


class ClassicStep(AttentionStep):
    """The reference: scores, softmax and gradients in fp32 (or wider) with an explicit mask."""

    @staticmethod
    def _probs(q_sbhd: Tensor, k_sbhd: Tensor, lse5: Tensor | None, blk: Block):
        """Probabilities [b, hkv, g, s_q, s_k] from ``lse5`` (None: this block's own), lse5."""
        hkv, dtype = k_sbhd.shape[2], lse_dtype(q_sbhd.dtype)
        q5, k5 = _grouped(q_sbhd, hkv, dtype), _grouped(k_sbhd, hkv, dtype)
        scores = torch.matmul(q5, k5.transpose(-1, -2)) * blk.scale
        allowed = _allowed(q_sbhd.shape[0], k_sbhd.shape[0], blk, q_sbhd.device)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -torch.inf)
        if lse5 is None:
            lse5 = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf: no visible key
        probs = torch.exp(scores - torch.where(torch.isneginf(lse5), 0.0, lse5))
        return probs, lse5, q5, k5

    def _forward(self, q_sbhd, k_sbhd, v_sbhd, blk):
        s_q, b, hq, _ = q_sbhd.shape
        with torch.autocast(q_sbhd.device.type, enabled=False):
            probs, lse5, _, _ = self._probs(q_sbhd, k_sbhd, None, blk)
            out5 = torch.matmul(probs, _grouped(v_sbhd, v_sbhd.shape[2], probs.dtype))
        return _ungrouped(out5, q_sbhd), lse5.reshape(b, hq, s_q)

    def _backward(self, dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk):
        hkv, dtype = k_sbhd.shape[2], lse_dtype(q_sbhd.dtype)
        with torch.autocast(q_sbhd.device.type, enabled=False):
            lse5 = _grouped(lse_bhs.permute(2, 0, 1)[..., None], hkv, dtype)  # [b,hkv,g,s_q,1]
            probs, _, q5, k5 = self._probs(q_sbhd, k_sbhd, lse5, blk)
            do5, o5 = _grouped(dout_sbhd, hkv, dtype), _grouped(out_sbhd, hkv, dtype)
            v5 = _grouped(v_sbhd, hkv, dtype)  # [b, hkv, 1, s_k, d]
            delta = (do5 * o5).sum(-1, keepdim=True)  # [b, hkv, g, s_q, 1]
            ds = probs * (torch.matmul(do5, v5.transpose(-1, -2)) - delta)
            dq5 = torch.matmul(ds, k5) * blk.scale  # [b, hkv, g, s_q, d]
            dk5 = torch.matmul(ds.transpose(-1, -2), q5).sum(2, keepdim=True) * blk.scale
            dv5 = torch.matmul(probs.transpose(-1, -2), do5).sum(2, keepdim=True)
        return _ungrouped(dq5, q_sbhd), _ungrouped(dk5, k_sbhd), _ungrouped(dv5, v_sbhd)


def _cudnn_usable(q_bhsd: torch.Tensor) -> bool:
    return (
        q_bhsd.dtype in (torch.float16, torch.bfloat16)
        and q_bhsd.shape[-1] <= 128
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


class SDPAStep(AttentionStep):
    """Fused kernels that return the log-sum-exp: cuDNN on CUDA, the flash kernel on CPU.

    Hands to another step documents (neither kernel takes separate q/k document ids), a
    causal block that is not square with equal offsets (the kernels' causal mask is the
    aligned diagonal), and on CUDA what cuDNN does not take (dtypes other than fp16/bf16,
    head dim above 128, cuDNN attention disabled): on CUDA the Triton step (O(s) memory; it
    falls back to the classic step for what it cannot run), on CPU the classic step. On
    CUDA, GQA repeats K/V for the cuDNN call (and sums dK/dV over the group); the CPU kernel
    takes GQA as it is.
    """

    classic = ClassicStep()

    def _other(self, q_sbhd: Tensor) -> AttentionStep:
        """The step for blocks the fused kernel does not take."""
        return TRITON_STEP if q_sbhd.is_cuda else self.classic

    @staticmethod
    def kernel_takes(q_sbhd: Tensor, k_sbhd: Tensor, blk: Block) -> bool:
        """Whether the fused kernel runs this block (else the classic step)."""
        square = blk.q_offset == blk.k_offset and q_sbhd.shape[0] == k_sbhd.shape[0]
        if blk.q_doc_ids is not None or (blk.masked and not square):
            return False
        return not q_sbhd.is_cuda or _cudnn_usable(q_sbhd)

    def _forward(self, q_sbhd, k_sbhd, v_sbhd, blk):
        if not self.kernel_takes(q_sbhd, k_sbhd, blk):
            return self._other(q_sbhd)._forward(q_sbhd, k_sbhd, v_sbhd, blk)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q_sbhd, k_sbhd, v_sbhd))  # [b, h, s, d]
        if q.is_cuda:
            k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, blk.masked, False, scale=blk.scale
            )[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, blk.masked, scale=blk.scale
            )
        lse_bhs = lse.reshape(lse.shape[:3]).to(lse_dtype(q.dtype))  # cuDNN's is [b, h, s, 1]
        return out.permute(2, 0, 1, 3), lse_bhs

    def _backward(self, dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk):
        if not self.kernel_takes(q_sbhd, k_sbhd, blk):
            other = self._other(q_sbhd)
            return other._backward(dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q_sbhd, k_sbhd, v_sbhd))  # [b, h, s, d]
        out = out_sbhd.permute(1, 2, 0, 3).to(q.dtype)
        # cuDNN's backward (torch 2.11) returns wrong gradients for a dout laid out
        # [s, b, h, d], whatever b (megatron.ops.contiguous_grad); contiguous is right.
        dout = dout_sbhd.permute(1, 2, 0, 3).to(q.dtype).contiguous()
        lse = lse_bhs.to(lse_dtype(q.dtype))
        if q.is_cuda:
            hkv, s_q, s_k = k.shape[1], q.shape[2], k.shape[2]
            k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
            no_rng = torch.zeros((), dtype=torch.long, device=q.device)  # no dropout: unused
            dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dout,
                q,
                k,
                v,
                out,
                lse[..., None],
                no_rng,
                no_rng,
                None,
                None,
                None,
                s_q,
                s_k,
                0.0,
                blk.masked,
                scale=blk.scale,
            )
            dk, dv = _sum_heads(dk, hkv), _sum_heads(dv, hkv)
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout, q, k, v, out, lse, 0.0, blk.masked, scale=blk.scale
            )
        return dq.permute(2, 0, 1, 3), dk.permute(2, 0, 1, 3), dv.permute(2, 0, 1, 3)


def _repeat_heads(t_bhsd: torch.Tensor, hq: int) -> torch.Tensor:
    """K/V heads repeated to ``hq`` (each KV head serves ``hq // hkv`` consecutive q heads)."""
    return t_bhsd if t_bhsd.shape[1] == hq else t_bhsd.repeat_interleave(hq // t_bhsd.shape[1], 1)


def _sum_heads(g_bhsd: torch.Tensor, hkv: int) -> torch.Tensor:
    """The gradient of ``_repeat_heads``: [b, hq, s, d] summed back to [b, hkv, s, d]."""
    b, hq, s, d = g_bhsd.shape
    return g_bhsd if hq == hkv else g_bhsd.reshape(b, hkv, hq // hkv, s, d).sum(2)


class TritonStep(AttentionStep):
    """This project's Triton FlashAttention kernels (megatron.ops.flash_attn_triton) as a step.

    Takes every case of the contract in one kernel call: separate query and key document ids
    (non-decreasing along the sequence, as packed sequences and their slices are), causal
    blocks at any offsets, GQA without repeating K/V. Falls back to ``ClassicStep`` where the
    kernels cannot run: head dims other than 64/96/128, float64, or a CPU without the Triton
    interpreter.
    """

    classic = ClassicStep()

    @staticmethod
    def kernel_takes(q_sbhd: Tensor) -> bool:
        """Whether the Triton kernels run this block (else the classic step)."""
        from megatron.ops.flash_attn_triton import step_unsupported  # imports triton: lazily

        return step_unsupported(q_sbhd) is None

    @staticmethod
    def _kw(blk: Block) -> dict:
        return {
            "causal": blk.masked,
            "shift": blk.q_offset - blk.k_offset,
            "softmax_scale": blk.scale,
            "q_doc_ids": blk.q_doc_ids,
            "k_doc_ids": blk.k_doc_ids,
        }

    def _forward(self, q_sbhd, k_sbhd, v_sbhd, blk):
        if not self.kernel_takes(q_sbhd):
            return self.classic._forward(q_sbhd, k_sbhd, v_sbhd, blk)
        from megatron.ops.flash_attn_triton import flash_attn_step_forward

        return flash_attn_step_forward(q_sbhd, k_sbhd, v_sbhd, **self._kw(blk))

    def _backward(self, dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk):
        if not self.kernel_takes(q_sbhd):
            return self.classic._backward(dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, blk)
        from megatron.ops.flash_attn_triton import flash_attn_step_backward

        return flash_attn_step_backward(
            dout_sbhd, q_sbhd, k_sbhd, v_sbhd, out_sbhd, lse_bhs, **self._kw(blk)
        )


CLASSIC_STEP = ClassicStep()
SDPA_STEP = SDPAStep()
TRITON_STEP = TritonStep()
