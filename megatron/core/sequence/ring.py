"""Ring attention (context parallelism): causal attention over a sequence sharded over the R
ranks of a ring group; K/V blocks travel around the ring while the current block computes.

Load balancing (Megatron-LM's layout): the sequence is cut into ``2R`` chunks of ``c``
tokens and ring rank ``i`` holds chunks ``i`` and ``2R-1-i``, in that order
(:func:`load_balanced_order`; the data path permutes tokens, positions, labels, loss mask and
document ids with it). Its local q/k/v are ``[2c, b, h, d]``. At ring step ``t`` rank ``i``
holds the K/V of rank ``j = (i - t) mod R`` and makes one call of the local attention step
(:mod:`megatron.model.attention_step`), every call over ``2 c^2`` query-key pairs:

* ``j == i``: its own pair, causal on local indices (chunk ``i`` precedes chunk ``2R-1-i``,
  so the true causal mask of the two chunks is the plain lower triangle);
* ``j < i``: all local queries against chunk ``j`` only (the first half of the block; chunk
  ``2R-1-j`` lies after both local chunks), no mask;
* ``j > i``: the second local chunk (``2R-1-i``) against both chunks of ``j`` (chunk ``i``
  lies before both), no mask.

Partial results are merged by log-sum-exp. The backward sends the K/V blocks around once
more, each with its dK/dV accumulator (fp32 or wider), which arrives home after R hops; each
block's gradients come from the step's backward with the merged output and log-sum-exp and
are added into the accumulator as it arrives (one zero-filled accumulator per backward).
K/V keep their own (GQA) head count: nothing is repeated. With packed documents, ``doc_ids``
``[b, s]`` (the whole sequence, load-balanced order) go to the step, and a call whose query
and key blocks share no document is skipped. No dropout.

Every exchange is one ``batch_isend_irecv`` on the ring group the caller passes; the ring
function keeps that group and uses nothing global.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def chunks_of_rank(rank: int, cp: int) -> tuple[int, int]:
    """The two (of ``2 cp``) sequence chunks ring rank ``rank`` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def load_balanced_order(seq: int, cp: int) -> Tensor:
    """Positions in the order the ring ranks hold them: rank 0's two chunks, then rank 1's, ...
    (``[seq]`` long; the identity for ``cp`` 1). ``seq`` must be a multiple of ``2 cp``."""
    if seq % (2 * cp):
        raise ValueError(f"sequence {seq} is not divisible by 2 x context-parallel size {cp}")
    c = seq // (2 * cp)
    chunks = torch.arange(seq).view(2 * cp, c)
    return torch.cat([chunks[k] for r in range(cp) for k in chunks_of_rank(r, cp)])


def step_rows(i: int, j: int, c: int) -> tuple[slice, slice, str]:
    """Local query rows, key rows of rank ``j``'s block, and the causal mode of that call."""
    if j == i:
        return slice(0, 2 * c), slice(0, 2 * c), "diagonal"
    if j < i:
        return slice(0, 2 * c), slice(0, c), "none"
    return slice(c, 2 * c), slice(0, 2 * c), "none"


def _exchange(send: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, list]:
    """Send ``send`` to the next ring rank, receive the previous one's; returns (recv, works)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _doc_spans(doc_ids: Tensor | None, i: int, cp: int, c: int) -> list[bool]:
    """For each ring rank j: whether any document spans this rank's call with j's block
    (always True without documents). Interval test per row, exact for ids that grow along
    the sequence, conservative otherwise; one host sync."""
    if doc_ids is None:
        return [True] * cp
    blocks = doc_ids.unflatten(1, (cp, 2 * c))  # [b, cp, 2c]
    flags = []
    for j in range(cp):
        qs, ks, _ = step_rows(i, j, c)
        qd, kd = blocks[:, i, qs], blocks[:, j, ks]
        overlap = (qd.amin(1) <= kd.amax(1)) & (kd.amin(1) <= qd.amax(1))
        flags.append(overlap.any())
    return torch.stack(flags).tolist()


class _RingAttention(torch.autograd.Function):
    """q ``[2c, b, hq, d]``, k/v ``[2c, b, hkv, d]``: this ring rank's load-balanced shard."""

    @staticmethod
    def forward(ctx, q, k, v, step, merge, group, scale: float, doc_ids):
        i, cp = dist.get_rank(group), dist.get_world_size(group)
        c = q.shape[0] // 2
        spans = _doc_spans(doc_ids, i, cp, c)
        docs = None if doc_ids is None else doc_ids.unflatten(1, (cp, 2 * c))  # [b, cp, 2c]
        kv = torch.stack((k, v))  # [2, 2c, b, hkv, d]: one message per hop
        out = lse = None
        for t in range(cp):
            j = (i - t) % cp
            if t < cp - 1:
                kv_next, works = _exchange(kv, group)
            if spans[j]:
                qs, ks, causal = step_rows(i, j, c)
                kw = {}
                if docs is not None:
                    kw = {"q_doc_ids": docs[:, i, qs], "k_doc_ids": docs[:, j, ks]}
                o_sbhd, l_bhs = step(
                    q[qs], kv[0, ks], kv[1, ks], causal=causal, softmax_scale=scale, **kw
                )
                if out is None:  # t == 0: the own block covers every local query
                    out, lse = o_sbhd.to(l_bhs.dtype), l_bhs
                else:
                    merge(out[qs], lse[..., qs], o_sbhd, l_bhs)  # in place
            if t < cp - 1:
                _wait(works)
                kv = kv_next
        out = out.to(q.dtype)
        ctx.step, ctx.group, ctx.scale, ctx.spans = step, group, scale, spans
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        step, group = ctx.step, ctx.group
        i, cp = dist.get_rank(group), dist.get_world_size(group)
        c = q.shape[0] // 2
        docs = None if doc_ids is None else doc_ids.unflatten(1, (cp, 2 * c))
        dq = torch.zeros_like(q, dtype=lse.dtype)
        kv = torch.stack((k, v))
        dkv_in = dkv_works = dkv_sent = None
        for t in range(cp):
            j = (i - t) % cp
            if t < cp - 1:
                kv_next, kv_works = _exchange(kv, group)
            grads = None
            if ctx.spans[j]:
                qs, ks, causal = step_rows(i, j, c)
                kw = {}
                if docs is not None:
                    kw = {"q_doc_ids": docs[:, i, qs], "k_doc_ids": docs[:, j, ks]}
                dq_p, dk_p, dv_p = step.backward(
                    dout[qs],
                    q[qs],
                    kv[0, ks],
                    kv[1, ks],
                    out[qs],
                    lse[..., qs].contiguous(),  # a kernel may assume packed statistics
                    causal=causal,
                    softmax_scale=ctx.scale,
                    **kw,
                )
                dq[qs] += dq_p
                grads = (ks, dk_p, dv_p)
            if dkv_works is None:  # t == 0: j's dK/dV starts here
                part = torch.zeros_like(kv, dtype=lse.dtype)
            else:  # what the ranks before this one added to j's dK/dV; this rank adds to it
                _wait(dkv_works)
                part = dkv_in
            if grads is not None:
                ks, dk_p, dv_p = grads
                part[0, ks] += dk_p
                part[1, ks] += dv_p
            dkv_sent = part  # kept alive until its send is waited for
            dkv_in, dkv_works = _exchange(dkv_sent, group)
            if t < cp - 1:
                _wait(kv_works)
                kv = kv_next
        _wait(dkv_works)  # after R hops every block's dK/dV is back with its owner
        del dkv_sent
        dk, dv = dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    step,
    merge,
    group: dist.ProcessGroup,
    softmax_scale: float,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """Causal attention ``[2c, b, hq, d]`` of this ring rank's load-balanced shard.

    ``step``: a local attention step (``AttentionStep``); ``merge``: its log-sum-exp merge,
    in place into its first two arguments (``attention_step.merge_``);
    ``doc_ids``: ``[b, 2c R]`` document ids of the whole sequence in load-balanced order."""
    cp = dist.get_world_size(group)
    if q.shape[0] % 2:
        raise ValueError(f"ring attention: local sequence {q.shape[0]} is not two equal chunks")
    if doc_ids is not None and doc_ids.shape[1] != q.shape[0] * cp:
        raise ValueError(
            f"ring attention: doc_ids cover {doc_ids.shape[1]} tokens, the ring {q.shape[0] * cp}"
        )
    return _RingAttention.apply(q, k, v, step, merge, group, softmax_scale, doc_ids)


class RingAttention(torch.nn.Module):
    """Ring attention around a local attention backend (its ``step`` and ``softmax_scale``),
    called like the backend: ``attn(q, k, v, *, doc_ids=None)`` on ``[2c, b, h, d]``."""

    def __init__(self, local: torch.nn.Module, group: dist.ProcessGroup, merge) -> None:
        super().__init__()
        self.local, self.group, self.merge = local, group, merge

    def forward(self, q, k, v, *, doc_ids: Tensor | None = None) -> Tensor:
        step, scale = self.local.step, self.local.softmax_scale
        return ring_attention(q, k, v, step, self.merge, self.group, scale, doc_ids)
