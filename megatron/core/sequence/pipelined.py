"""Ulysses attention with the all-to-alls pipelined against the local attention.

Each rank's block of heads is cut into ``chunks`` groups. All input all-to-alls start at once
(asynchronously); attention on chunk c runs as soon as chunk c has arrived, and chunk c's output
all-to-all is started before chunk c+1 computes. Backward mirrors it. The result is exactly
the plain :class:`~megatron.core.sequence.layer.DistributedAttention`'s: attention is
independent per head, and every head lands on the same rank in the same order.

Head order: for ``h`` heads over ``p`` ranks and ``C`` chunks, chunk ``c`` of rank ``r`` holds
heads ``r*h/p + c*h/(p*C) + j``; a chunk's tensor in the sequence-sharded layout is therefore
``x.unflatten(head, (p, C, h/(p*C)))[:, :, c]``, a strided view that the all-to-all packs
directly; the outputs come back as ``[..., p, h/(p*C), ...]`` views and are stacked into
place with one copy.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.core.comm import head_to_seq_start, seq_to_head_start


def effective_chunks(requested: int, heads_per_rank: int, kv_heads_per_rank: int) -> int:
    """The largest chunk count <= requested that splits both head blocks evenly."""
    return math.gcd(math.gcd(max(1, requested), heads_per_rank), kv_heads_per_rank)


def _chunk(x: torch.Tensor, p: int, chunks: int, head_dim: int) -> list[torch.Tensor]:
    """``[..., h, ...]`` -> ``chunks`` strided views ``[..., p, h/(pC), ...]`` (no copy)."""
    blocks = x.unflatten(head_dim, (p, chunks, x.shape[head_dim] // (p * chunks)))
    return [blocks.select(head_dim + 1, c) for c in range(chunks)]


def _unchunk(parts: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """Inverse of :func:`_chunk`: ``chunks`` x ``[..., p, w, ...]`` -> ``[..., p*C*w, ...]``."""
    return torch.stack(parts, dim=head_dim + 1).flatten(head_dim, head_dim + 2)


class PipelinedUlyssesAttention(torch.autograd.Function):
    """Sequence-sharded q/k/v in, sequence-sharded context out; see the module docstring."""

    @staticmethod
    def forward(ctx, local_attention, group, seq_dim, head_dim, chunks, kwargs, query, key, value):
        p = dist.get_world_size(group)
        pieces = [_chunk(t, p, chunks, head_dim) for t in (query, key, value)]
        # [s/p, b, h/C, d] -> [s, b, h/(pC), d] for every chunk, all in flight at once
        arriving = [
            seq_to_head_start(
                [pieces[0][c], pieces[1][c], pieces[2][c]],
                group,
                seq_dim,
                head_dim,
                heads_split=True,
            )
            for c in range(chunks)
        ]
        graphs, leaving = [], []
        needs = ctx.needs_input_grad[6:9]
        for c in range(chunks):
            full = arriving[c].wait()
            leaves = [t.detach().requires_grad_(need) for t, need in zip(full, needs)]
            with torch.enable_grad():
                context = local_attention(*leaves, **kwargs)
            graphs.append((leaves, context))
            # [s, b, h/(pC), d] -> [s/p, b, h/C, d]; overlaps with the next chunk's attention
            leaving.append(
                head_to_seq_start([context.detach()], group, seq_dim, head_dim, merge_heads=False)
            )
        outs = [pending.wait()[0] for pending in leaving]
        ctx.graphs, ctx.group, ctx.dims, ctx.p = graphs, group, (seq_dim, head_dim), p
        return _unchunk(outs, head_dim)

    @staticmethod
    def backward(ctx, grad_out):
        seq_dim, head_dim = ctx.dims
        graphs = ctx.graphs
        grads_in = _chunk(grad_out, ctx.p, len(graphs), head_dim)
        arriving = [
            seq_to_head_start([g], ctx.group, seq_dim, head_dim, heads_split=True) for g in grads_in
        ]
        leaving = []
        for c, (leaves, context) in enumerate(graphs):
            (grad_context,) = arriving[c].wait()
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            got = iter(torch.autograd.grad(context, wanted, grad_context))
            grads = [next(got) if leaf.requires_grad else torch.zeros_like(leaf) for leaf in leaves]
            leaving.append(
                head_to_seq_start(grads, ctx.group, seq_dim, head_dim, merge_heads=False)
            )
        per_chunk = [pending.wait() for pending in leaving]  # chunks x [dq, dk, dv]
        ctx.graphs = None
        dq, dk, dv = (_unchunk([chunk[i] for chunk in per_chunk], head_dim) for i in range(3))
        return None, None, None, None, None, None, dq, dk, dv
