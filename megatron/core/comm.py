"""Communication primitives as small autograd functions; each takes its group as an argument.

The Ulysses all-to-alls flip tensors between two layouts:

* sequence-sharded: ``[..., s/p, ..., h, ...]`` (every head, this rank's slice of tokens)
* head-sharded:     ``[..., s, ..., h/p, ...]`` (every token, this rank's block of heads)

``seq_dim`` and ``head_dim`` name the positions of those dimensions, so one implementation
serves ``[s, b, h, d]`` (seq_dim 0) and ``[b, s, h, d]`` (seq_dim 1), and also a merged
``[s, b, h*d]`` context (a block of heads is a contiguous block of ``h*d``). Several tensors
travel in ONE all-to-all: each is cut into per-rank blocks and the blocks are concatenated
along the head dimension, so rank ``r`` receives its heads of every tensor in one message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist


class PendingExchange:
    """An all-to-all in flight; ``wait()`` returns the unpacked tensors."""

    def __init__(self, recv: torch.Tensor, work, unpack) -> None:
        self._recv, self._work, self._unpack = recv, work, unpack

    def wait(self) -> list[torch.Tensor]:
        if self._work is not None:
            self._work.wait()
        return self._unpack(self._recv)

    @property
    def received(self) -> torch.Tensor:
        """The receive buffer itself (valid after ``wait()``)."""
        return self._recv


_WIDE_DTYPES = (torch.complex128, torch.int64, torch.int32)  # 16, 8, 4 bytes


def _wide_views(dst: torch.Tensor, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dst`` and ``src`` reinterpreted with the widest element (<= 16 bytes) both allow.

    A strided copy moves one element per index computation; the all-to-all layouts have
    contiguous runs of ``head_dim`` values, so viewing them as 16-byte elements moves up to
    8 bf16 values per index computation (measured about 1.5 TB/s for bf16 elements on H100).
    """
    for wide in _WIDE_DTYPES:
        if wide.itemsize <= src.element_size():
            break
        try:
            return dst.view(wide), src.view(wide)
        except RuntimeError:  # the last dim, a stride or the offset is not a multiple
            continue
    return dst, src


def copy_wide_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for same-dtype tensors, through wide-element views; returns ``dst``."""
    if dst.dtype != src.dtype or src.is_complex() or src.requires_grad:
        return dst.copy_(src)
    wide_dst, wide_src = _wide_views(dst, src)
    wide_dst.copy_(wide_src)
    return dst


def _contiguous_wide(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()`` through wide-element views."""
    if x.is_contiguous():
        return x
    return copy_wide_(torch.empty(x.shape, dtype=x.dtype, device=x.device), x)


def _flatten_pair(y: torch.Tensor, dim: int) -> torch.Tensor:
    """``y.flatten(dim, dim + 1)``: a view where the strides allow, else one wide copy.

    (Decided from the strides, not by trying ``view``: a failed view raises, which costs tens
    of microseconds of CPU in forward passes that are CPU-bound.)"""
    shape = (*y.shape[:dim], y.shape[dim] * y.shape[dim + 1], *y.shape[dim + 2 :])
    n_outer, n_inner = y.shape[dim], y.shape[dim + 1]
    if n_outer == 1 or n_inner == 1 or y.stride(dim) == y.stride(dim + 1) * n_inner:
        return y.view(shape)
    return _contiguous_wide(y).view(shape)


def _pack(blocks: list[torch.Tensor], dim: int) -> torch.Tensor:
    """One contiguous send buffer from per-rank blocks (each block copied once)."""
    if len(blocks) == 1:
        return _contiguous_wide(blocks[0])
    shape = list(blocks[0].shape)
    shape[dim] = sum(b.shape[dim] for b in blocks)
    send = torch.empty(shape, dtype=blocks[0].dtype, device=blocks[0].device)
    start = 0
    for b in blocks:
        copy_wide_(send.narrow(dim, start, b.shape[dim]), b)
        start += b.shape[dim]
    return send


def _start(
    blocks: list[torch.Tensor], group, head_dim: int, merge_at, async_op: bool
) -> PendingExchange:
    """Send block r of every tensor to rank r, as one message; ``merge_at(y)`` unpacks each."""
    send = _pack(blocks, head_dim + 1)
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=async_op)
    widths = [b.shape[head_dim + 1] for b in blocks]

    def unpack(buf: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for width in widths:
            outs.append(merge_at(buf.narrow(head_dim + 1, start, width)))
            start += width
        return outs

    return PendingExchange(recv, work if async_op else None, unpack)


def seq_to_head_start(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    seq_dim: int,
    head_dim: int,
    async_op: bool = True,
    heads_split: bool = False,
) -> PendingExchange:
    """Start sequence-sharded -> head-sharded; outputs are views of one receive buffer.

    ``heads_split``: the inputs already hold their heads as ``[..., p, h/p, ...]`` (two dims
    at ``head_dim``), e.g. strided views of a subset of heads, so no copy is made to split them.
    """
    p = dist.get_world_size(group)
    # [..., h, ...] -> [p, ..., h/p, ...]: block r holds the heads that rank r will own.
    if not heads_split:
        tensors = [x.unflatten(head_dim, (p, x.shape[head_dim] // p)) for x in tensors]
    blocks = [x.movedim(head_dim, 0) for x in tensors]

    # recv: [p (source rank = sequence block), ..., s/p, ..., h/p, ...] -> [..., s, ..., h/p, ...]
    def merge(y: torch.Tensor) -> torch.Tensor:
        return _flatten_pair(y.movedim(0, seq_dim), seq_dim)

    return _start(blocks, group, head_dim, merge, async_op)


def head_to_seq_start(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    seq_dim: int,
    head_dim: int,
    async_op: bool = True,
    merge_heads: bool = True,
) -> PendingExchange:
    """Start head-sharded -> sequence-sharded.

    ``merge_heads=False`` leaves the outputs as views ``[..., s/p, ..., p, h/p, ...]`` of the
    receive buffer instead of copying them into ``[..., s/p, ..., h, ...]``.
    """
    p = dist.get_world_size(group)
    # [..., s, ..., h/p, ...] -> [p, ..., s/p, ..., h/p, ...]: block r is rank r's tokens.
    blocks = [x.unflatten(seq_dim, (p, x.shape[seq_dim] // p)).movedim(seq_dim, 0) for x in tensors]

    # recv: [p (source rank = head block), ..., s/p, ..., h/p, ...] -> [..., s/p, ..., h, ...]
    def merge(y: torch.Tensor) -> torch.Tensor:
        y = y.movedim(0, head_dim)
        return _flatten_pair(y, head_dim) if merge_heads else y

    return _start(blocks, group, head_dim, merge, async_op)


Overlap = Callable[[], None] | None  # work launched while an exchange is in flight


def _finish(pending: PendingExchange, overlap: Overlap) -> list[torch.Tensor]:
    if overlap is not None:
        overlap()
    return pending.wait()


def seq_to_head(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    seq_dim: int,
    head_dim: int,
    overlap: Overlap = None,
) -> list[torch.Tensor]:
    """Sequence-sharded -> head-sharded, no autograd. Outputs are views of one buffer.
    ``overlap()`` runs (launches its kernels) while the exchange is in flight."""
    pending = seq_to_head_start(tensors, group, seq_dim, head_dim, async_op=overlap is not None)
    return _finish(pending, overlap)


def head_to_seq(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup,
    seq_dim: int,
    head_dim: int,
    out: Sequence[torch.Tensor] | None = None,
    overlap: Overlap = None,
) -> list[torch.Tensor]:
    """Head-sharded -> sequence-sharded, no autograd; into ``out`` when given (each merged
    with one copy, e.g. into column views of a fused QKV gradient). ``overlap()`` runs while
    the exchange is in flight."""
    pending = head_to_seq_start(
        tensors, group, seq_dim, head_dim, async_op=overlap is not None, merge_heads=out is None
    )
    if out is None:
        return _finish(pending, overlap)
    pieces = _finish(pending, overlap)  # [..., s/p, ..., p, h/p, ...] views of the receive buffer
    p = dist.get_world_size(group)
    for dst, piece in zip(out, pieces):
        copy_wide_(dst.unflatten(head_dim, (p, dst.shape[head_dim] // p)), piece)
    return list(out)


def _grads_or_zeros(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Size], ref: torch.Tensor
):
    return [g if g is not None else ref.new_zeros(shape) for g, shape in zip(grads, like)]


class SeqToHeadAllToAll(torch.autograd.Function):
    """Sequence-sharded -> head-sharded; backward is the reverse all-to-all, with
    ``backward_overlap()`` (or None) run while it is in flight."""

    @staticmethod
    def forward(ctx, group, seq_dim, head_dim, backward_overlap, *tensors):
        ctx.group, ctx.seq_dim, ctx.head_dim = group, seq_dim, head_dim
        ctx.overlap = backward_overlap
        outs = seq_to_head(tensors, group, seq_dim, head_dim)
        ctx.out_shapes = [o.shape for o in outs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads = _grads_or_zeros(grads, ctx.out_shapes, next(g for g in grads if g is not None))
        ins = head_to_seq(grads, ctx.group, ctx.seq_dim, ctx.head_dim, overlap=ctx.overlap)
        return (None, None, None, None, *ins)


class HeadToSeqAllToAll(torch.autograd.Function):
    """Head-sharded -> sequence-sharded; backward is the reverse all-to-all, with
    ``backward_overlap()`` (or None) run while it is in flight."""

    @staticmethod
    def forward(ctx, group, seq_dim, head_dim, backward_overlap, *tensors):
        ctx.group, ctx.seq_dim, ctx.head_dim = group, seq_dim, head_dim
        ctx.overlap = backward_overlap
        outs = head_to_seq(tensors, group, seq_dim, head_dim)
        ctx.out_shapes = [o.shape for o in outs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads = _grads_or_zeros(grads, ctx.out_shapes, next(g for g in grads if g is not None))
        ins = seq_to_head(grads, ctx.group, ctx.seq_dim, ctx.head_dim, overlap=ctx.overlap)
        return (None, None, None, None, *ins)


class FusedQKVSeqToHead(torch.autograd.Function):
    """:class:`SeqToHeadAllToAll` for Q, K, V that are column slices of one fused projection
    output ``qkv`` ``[..., (hq + 2 hkv) d]``: the gradient flows to ``qkv`` itself, and the
    received dQ, dK, dV blocks are copied once, straight into it (instead of a merge per
    tensor and then the split's concatenation: 2x the bytes)."""

    @staticmethod
    def forward(ctx, group, seq_dim, head_dim, backward_overlap, qkv, q, k, v):
        ctx.group, ctx.seq_dim, ctx.head_dim = group, seq_dim, head_dim
        ctx.overlap = backward_overlap
        ctx.qkv_shape, ctx.shapes = qkv.shape, [t.shape for t in (q, k, v)]
        outs = seq_to_head([q, k, v], group, seq_dim, head_dim)
        ctx.out_shapes = [o.shape for o in outs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads = _grads_or_zeros(grads, ctx.out_shapes, next(g for g in grads if g is not None))
        grad_qkv = grads[0].new_empty(ctx.qkv_shape)
        columns, start = [], 0
        for shape in ctx.shapes:  # [..., h_t, d] column block of the fused gradient
            width = shape[-2] * shape[-1]
            columns.append(grad_qkv.narrow(-1, start, width).view(shape))
            start += width
        head_to_seq(grads, ctx.group, ctx.seq_dim, ctx.head_dim, out=columns, overlap=ctx.overlap)
        return None, None, None, None, grad_qkv, None, None, None


class RankMajorQKVSeqToHead(torch.autograd.Function):
    """Sequence-sharded -> head-sharded for a Q/K/V send buffer already in send order.

    ``qkv_pnc`` ``[p, s/p, b, c]``: block r holds rank r's q, k and v heads (``widths`` columns
    each, as :mod:`megatron.model.rank_major_qkv` computes it), so it is sent as it is; the
    outputs ``[s, b, h_t/p, d]`` are views of the receive buffer. In backward the dQ/dK/dV
    blocks are packed in the same order, and the receive buffer is ``qkv_pnc``'s gradient.
    """

    @staticmethod
    def forward(ctx, group, widths, head_dim, backward_overlap, qkv_pnc):
        ctx.group, ctx.overlap = group, backward_overlap
        p, s_local, b, c = qkv_pnc.shape
        recv = torch.empty_like(qkv_pnc)
        dist.all_to_all_single(recv, qkv_pnc.contiguous(), group=group)
        full = recv.view(p * s_local, b, c)  # [p (source = sequence block), s/p] -> s
        outs, start = [], 0
        for width in widths:
            outs.append(full.narrow(-1, start, width).unflatten(-1, (width // head_dim, head_dim)))
            start += width
        ctx.out_shapes = [o.shape for o in outs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        grads = _grads_or_zeros(grads, ctx.out_shapes, next(g for g in grads if g is not None))
        # [s, b, h_t/p, d] -> blocks [p, s/p, b, ...] packed along the heads: [p, s/p, b, c]
        pending = head_to_seq_start(
            grads, ctx.group, 0, 2, async_op=ctx.overlap is not None, merge_heads=False
        )
        _finish(pending, ctx.overlap)
        recv = pending.received  # [p (source = head block), s/p, b, h_total/p, d]
        return None, None, None, None, recv.flatten(-2)


def fused_qkv_source(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int
) -> torch.Tensor | None:
    """The fused ``[..., (hq + 2 hkv) d]`` tensor whose consecutive column blocks ``q``, ``k``
    and ``v`` (``[..., h, d]`` views) are, as a view of their common base, or None.

    The base may have another shape (``F.linear`` on ``[s, b, h]`` returns a view of its
    ``[s * b, n]`` result) as long as it is contiguous and exactly tiled by the three blocks.
    """
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    if head_dim != q.dim() - 2:
        return None
    lead, d = q.shape[:-2], q.shape[-1]
    width = (q.shape[-2] + k.shape[-2] + v.shape[-2]) * d
    if base.numel() != lead.numel() * width:
        return None
    # Strides of a contiguous [*lead, width]; those of size-1 dims are arbitrary: skip them.
    want, step = [], width
    for n in reversed(lead):
        want.insert(0, step)
        step *= n
    offset = base.storage_offset()
    for t in (q, k, v):
        if (
            t.shape[:-2] != lead
            or t.shape[-1] != d
            or any(n > 1 and st != w for n, st, w in zip(lead, t.stride()[:-2], want))
            or (t.shape[-2] > 1 and t.stride(-2) != d)
            or t.stride(-1) != 1
            or t.storage_offset() != offset
        ):
            return None
        offset += t.shape[-2] * d
    return base.view(*lead, width)


# ------------------------------------------------------------- uneven blocks of heads
# When ranks own different numbers of heads (``counts[r]`` heads of a tensor on rank r; a
# head may be several elements wide along ``head_dim``, e.g. ``h*d`` merged contexts), the
# blocks differ in size: one all_to_all_single with split sizes over flat buffers.


def _head_widths(x: torch.Tensor, head_dim: int, counts: Sequence[int], local: int | None):
    """Elements along ``head_dim`` per rank: ``x`` holds ``counts[local]`` heads (or all)."""
    held = sum(counts) if local is None else counts[local]
    unit = x.shape[head_dim] // held
    return [c * unit for c in counts]


def _uneven_exchange(send_blocks, cat_dim, recv_shapes, group, overlap):
    """Send to rank r the tensors ``send_blocks[r]`` side by side along ``cat_dim`` (packed
    with one copy); receive one block of ``recv_shapes[j]`` from each rank j. Returns the
    receive buffer (flat) and its sizes per source; ``overlap()`` runs while it is in flight."""
    ref = send_blocks[0][0]
    shapes_in = []
    for parts in send_blocks:
        shape = list(parts[0].shape)
        shape[cat_dim] = sum(t.shape[cat_dim] for t in parts)
        shapes_in.append(shape)
    sizes_in = [torch.Size(shape).numel() for shape in shapes_in]
    send = torch.empty(sum(sizes_in), dtype=ref.dtype, device=ref.device)
    for piece, shape, parts in zip(send.split(sizes_in), shapes_in, send_blocks):
        block, start = piece.view(shape), 0
        for t in parts:
            copy_wide_(block.narrow(cat_dim, start, t.shape[cat_dim]), t)
            start += t.shape[cat_dim]
    sizes_out = [torch.Size(shape).numel() for shape in recv_shapes]
    recv = torch.empty(sum(sizes_out), dtype=ref.dtype, device=ref.device)
    work = dist.all_to_all_single(
        recv, send, sizes_out, sizes_in, group=group, async_op=overlap is not None
    )
    if overlap is not None:
        overlap()
        work.wait()
    return recv, sizes_out


def uneven_seq_to_head(
    tensors: Sequence[torch.Tensor],
    counts: Sequence[Sequence[int]],
    group: dist.ProcessGroup,
    seq_dim: int,
    head_dim: int,
    overlap: Overlap = None,
) -> list[torch.Tensor]:
    """:func:`seq_to_head` where rank r owns ``counts[t][r]`` heads of tensor t (its block
    of heads in rank order); no autograd. ``overlap()`` runs while the exchange is in flight.
    The outputs are views of one receive buffer."""
    p, me = dist.get_world_size(group), dist.get_rank(group)
    widths = [_head_widths(x, head_dim, c, None) for x, c in zip(tensors, counts)]
    per_tensor = [x.split(w, dim=head_dim) for x, w in zip(tensors, widths)]
    # block r: rank r's heads of every tensor, side by side along the heads
    send = [[parts[r] for parts in per_tensor] for r in range(p)]
    mine = [w[me] for w in widths]
    shape = list(tensors[0].shape)
    shape[head_dim] = sum(mine)
    recv, _ = _uneven_exchange(send, head_dim, [shape] * p, group, overlap)
    # [p (source = sequence block), ..., s/p, ..., w, ...] -> [..., s, ..., w, ...]
    full = recv.view(p, *shape).movedim(0, seq_dim)
    return [_flatten_pair(y, seq_dim) for y in full.split(mine, dim=head_dim + 1)]


def uneven_head_to_seq(
    tensors: Sequence[torch.Tensor],
    counts: Sequence[Sequence[int]],
    group: dist.ProcessGroup,
    seq_dim: int,
    head_dim: int,
    overlap: Overlap = None,
) -> list[torch.Tensor]:
    """:func:`head_to_seq` where rank r owns ``counts[t][r]`` heads of tensor t; no autograd."""
    p, me = dist.get_world_size(group), dist.get_rank(group)
    widths = [_head_widths(x, head_dim, c, me) for x, c in zip(tensors, counts)]
    # block r: rank r's tokens of my heads of every tensor
    chunks = [x.chunk(p, dim=seq_dim) for x in tensors]
    send = [[c[r] for c in chunks] for r in range(p)]
    recv_shapes = []
    for j in range(p):
        shape = list(send[0][0].shape)
        shape[head_dim] = sum(w[j] for w in widths)
        recv_shapes.append(shape)
    recv, sizes = _uneven_exchange(send, head_dim, recv_shapes, group, overlap)
    # from rank j: its heads of every tensor; tensor t is rank 0's, rank 1's, ... heads
    pieces = [
        piece.view(shape).split([w[j] for w in widths], dim=head_dim)
        for j, (piece, shape) in enumerate(zip(recv.split(sizes), recv_shapes))
    ]
    return [torch.cat([pieces[j][t] for j in range(p)], dim=head_dim) for t in range(len(widths))]


def _uneven_forward(ctx, exchange, group, seq_dim, head_dim, counts, backward_overlap, tensors):
    """Forward of the uneven all-to-alls: ``exchange`` one way, the other way in backward."""
    ctx.args = (counts, group, seq_dim, head_dim)
    ctx.overlap = backward_overlap
    outs = exchange(tensors, counts, group, seq_dim, head_dim)
    ctx.out_shapes = [o.shape for o in outs]
    return tuple(outs)


def _uneven_backward(ctx, exchange, grads):
    grads = _grads_or_zeros(grads, ctx.out_shapes, next(g for g in grads if g is not None))
    return (None, None, None, None, None, *exchange(grads, *ctx.args, overlap=ctx.overlap))


class UnevenSeqToHead(torch.autograd.Function):
    """:class:`SeqToHeadAllToAll` with ``counts[t][r]`` heads of tensor t on rank r."""

    @staticmethod
    def forward(ctx, group, seq_dim, head_dim, counts, backward_overlap, *tensors):
        return _uneven_forward(
            ctx, uneven_seq_to_head, group, seq_dim, head_dim, counts, backward_overlap, tensors
        )

    @staticmethod
    def backward(ctx, *grads):
        return _uneven_backward(ctx, uneven_head_to_seq, grads)


class UnevenHeadToSeq(torch.autograd.Function):
    """:class:`HeadToSeqAllToAll` with ``counts[t][r]`` heads of tensor t on rank r."""

    @staticmethod
    def forward(ctx, group, seq_dim, head_dim, counts, backward_overlap, *tensors):
        return _uneven_forward(
            ctx, uneven_head_to_seq, group, seq_dim, head_dim, counts, backward_overlap, tensors
        )

    @staticmethod
    def backward(ctx, *grads):
        return _uneven_backward(ctx, uneven_seq_to_head, grads)


class AllReduceSumIdentityGrad(torch.autograd.Function):
    """Sum over the group in forward; identity in backward.

    Used where every rank needs the group's total (e.g. the loss numerator over SP ranks)
    while each rank's gradient stays local: the gradient reduction sums over SP later.
    """

    @staticmethod
    def forward(ctx, group, x):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def all_reduce_sum_identity_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return AllReduceSumIdentityGrad.apply(group, x)


def all_reduce_no_grad(
    x: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce of a tensor that carries no gradient; returns it."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x
