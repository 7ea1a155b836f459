"""DistributedAttention equals the local attention on the full tensors (forward and backward)."""

import pytest
import torch
import torch.distributed as dist
from dist_helper import get_world

from megatron.core.sequence.heads import head_split
from megatron.core.sequence.layer import DistributedAttention
from megatron.model.rank_major_qkv import rank_major_rows


def causal_attention(q, k, v, seq_dim=0, merge_heads=False):
    """Plain causal attention with GQA; q [s, b, h, d] (seq_dim 0) or [b, s, h, d]."""
    if seq_dim == 0:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # -> [b, s, h, d]
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    s = q.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    if seq_dim == 0:
        out = out.transpose(0, 1)
    return out.flatten(2) if merge_heads else out


CASES = [
    # (sp, seq_dim, batch, heads, kv_heads, merge_heads[, Q/K/V source])
    (2, 0, 1, 4, 4, False),
    (2, 1, 3, 8, 8, False),
    (2, 0, 3, 4, 2, True),
    (4, 0, 1, 8, 8, False),
    (4, 1, 1, 4, 4, False),
    (4, 0, 3, 4, 4, False),
    (4, 1, 3, 8, 8, True),
    (4, 0, 3, 8, 2, False),
    (4, 1, 1, 8, 1, False),
    (4, 0, 3, 4, 1, False),
    (4, 1, 3, 8, 2, False),
    # Q, K, V as column slices of one fused projection output: the gradient goes to it
    (2, 0, 3, 4, 2, False, "fused"),
    (4, 0, 1, 8, 4, True, "fused"),
    (4, 0, 3, 8, 8, False, "fused"),
    (4, 0, 1, 8, 2, False, "fused"),  # K/V heads replicated: the unfused path
    # ... of a view of a 2-D result, as F.linear returns for [s, b, h] inputs
    (2, 0, 3, 4, 2, False, "fused-2d"),
    (4, 1, 2, 8, 4, False, "fused-2d"),
    # ... already in send order (rank_major_qkv): no packing; its buffer gets the gradient
    (2, 0, 3, 4, 2, False, "rank-major"),
    (4, 0, 1, 8, 8, True, "rank-major"),
    (4, 0, 3, 8, 2, False, "rank-major"),  # K/V heads replicated: rows repeat
    (4, 0, 2, 4, 1, False, "rank-major"),
    # uneven heads (ranks get 2/2/1/1 or 2/2/2/1 query heads): all-to-alls with split sizes
    (4, 0, 2, 6, 6, False),
    (4, 1, 1, 7, 7, True),
    (4, 0, 3, 6, 1, False),  # one K/V head: every rank a copy
    (4, 1, 2, 6, 2, False),  # rank 1's two query heads use different K/V heads
    (4, 0, 1, 7, 1, True),
    (4, 0, 2, 6, 2, False, "fused"),
    (2, 0, 2, 6, 3, False),  # equal query heads, 3 K/V heads over 2 ranks: per-head copies
    (2, 0, 2, 6, 3, False, "rank-major"),
]


def _parse(case):
    """(sp, seq_dim, batch, heads, kv_heads, merge, fused) of a CASES entry;
    fused is "", "fused", "fused-2d" or "rank-major"."""
    sp, seq_dim, b, h, h_kv, merge, *rest = case
    return sp, seq_dim, b, h, h_kv, merge, rest[0] if rest else ""


def _check_cases(cases):
    from megatron.core import parallel_state as ps
    from megatron.core.sequence import layer

    results = []
    for case in cases:
        sp, seq_dim, b, h, h_kv, merge, fused = _parse(case)
        state = ps.initialize_model_parallel(sequence_parallel_size=sp)
        torch.manual_seed(1234 + 17 * len(results))
        s, d = 16, 8
        q_shape = (s, b, h, d) if seq_dim == 0 else (b, s, h, d)
        qkv = torch.randn(*q_shape[:2], (h + 2 * h_kv) * d)
        q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([h * d, h_kv * d, h_kv * d], -1))
        grad_out = torch.randn(q_shape).flatten(2) if merge else torch.randn(q_shape)

        def local(q_, k_, v_, merge=merge, seq_dim=seq_dim):
            return causal_attention(q_, k_, v_, seq_dim=seq_dim, merge_heads=merge)

        # Reference: the whole tensors in this one process.
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = local(*ref_in)
        (ref_out * grad_out).sum().backward()

        # Ulysses: this rank's contiguous slice of the sequence.
        start, length = state.sp_rank * s // sp, s // sp

        def take(t, seq_dim=seq_dim, start=start, length=length):
            return t.narrow(seq_dim, start, length)

        my_in = [take(t).clone().requires_grad_() for t in (q, k, v)]
        if fused == "rank-major":
            rows = rank_major_rows(h, h_kv, d, sp)
            c = rows.numel() // sp
            # [s/p, b, n] -> [p, s/p, b, c]: block r = rank r's q, k, v heads
            my_pnc = take(qkv)[..., rows].unflatten(-1, (sp, c)).movedim(2, 0).contiguous()
            my_pnc.requires_grad_()
            widths = (h // sp * d, *(2 * (head_split(h, h_kv, sp).kv_counts[0] * d,)))
        elif fused:  # one leaf; the inputs are its column slices
            my_qkv = take(qkv).clone().requires_grad_()
            src = my_qkv
            if fused == "fused-2d":  # a [tokens, n] result viewed as [s, b, n] or [b, s, n]
                src = (my_qkv.reshape(-1, my_qkv.shape[-1]) * 1.0).view(my_qkv.shape)
            split = src.split([h * d, h_kv * d, h_kv * d], -1)
            attn_in = [t.unflatten(-1, (-1, d)) for t in split]
        else:
            attn_in = my_in
        calls, fused_calls = [], []
        real_fused = layer.FusedQKVSeqToHead.apply

        def fused_apply(*a, real_fused=real_fused, fused_calls=fused_calls):
            fused_calls.append(1)
            return real_fused(*a)

        layer.FusedQKVSeqToHead.apply = fused_apply
        real = dist.all_to_all_single

        def counting(*a, calls=calls, real=real, **kw):
            calls.append(1)
            return real(*a, **kw)

        dist.all_to_all_single = counting
        try:
            attn = DistributedAttention(
                local,
                state.sp_group,
                scatter_idx=2,
                gather_idx=seq_dim,
            )
            if fused == "rank-major":
                out = attn.attend_rank_major(my_pnc, widths, d)
            else:
                out = attn(*attn_in)
            (out * take(grad_out)).sum().backward()
        finally:
            dist.all_to_all_single = real
            layer.FusedQKVSeqToHead.apply = real_fused
        if fused == "rank-major":
            grad = torch.zeros(take(qkv).shape).index_add_(
                2, rows, my_pnc.grad.movedim(0, 2).flatten(2)
            )
            for m, g in zip(my_in, grad.split([h * d, h_kv * d, h_kv * d], -1)):
                m.grad = g.unflatten(-1, (-1, d))
        elif fused:
            for m, g in zip(my_in, my_qkv.grad.split([h * d, h_kv * d, h_kv * d], -1)):
                m.grad = g.unflatten(-1, (-1, d))
        errs = [(out - take(ref_out)).abs().max().item()]
        errs += [(m.grad - take(r.grad)).abs().max().item() for m, r in zip(my_in, ref_in)]
        results.append({"max_err": max(errs), "all_to_alls": len(calls), "shape": tuple(out.shape),
                        "fused_path": bool(fused_calls)})  # fmt: skip
        ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def results():
    by_sp = {}
    for sp in (2, 4):
        cases = [c for c in CASES if c[0] == sp]
        per_rank = get_world(sp).run(_check_cases, cases)
        for case_i, case in enumerate(cases):
            by_sp[case] = [r[case_i] for r in per_rank]
    return by_sp


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: "sp{}-dim{}-b{}-h{}-kv{}-merge{}".format(*c) + "".join(f"-{x}" for x in c[6:]),
)
def test_matches_full_attention(results, case):
    sp, seq_dim, b, h, h_kv, merge, fused = _parse(case)
    for rank_result in results[case]:
        assert rank_result["max_err"] <= 1e-5
        # Q, K, V in one all-to-all and the context in one; backward mirrors it.
        assert rank_result["all_to_alls"] == 4
        expected = (16 // sp, b) if seq_dim == 0 else (b, 16 // sp)
        assert rank_result["shape"][:2] == expected
        # The fused path is taken exactly for slices of one tensor with whole K/V heads per rank.
        assert rank_result["fused_path"] == (fused.startswith("fused") and h_kv % sp == 0)


def test_sp1_is_pass_through():
    torch.manual_seed(0)
    q = torch.randn(8, 2, 4, 8)
    attn = DistributedAttention(causal_attention, None)
    torch.testing.assert_close(attn(q, q, q), causal_attention(q, q, q), rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype,shape,index",
    [
        (torch.bfloat16, (4, 3, 6, 16), (slice(None), slice(1, 3))),  # 16-byte elements
        (torch.float32, (2, 5, 4, 6), (slice(None), slice(None), slice(1, 3))),  # 8-byte
        (torch.float32, (3, 5, 3), (slice(None), slice(1, 4))),  # odd last dim: plain copy
    ],
)
def test_wide_copies_equal_plain_copies(dtype, shape, index):
    """The all-to-all's packing and merging copies move wide elements but the same bytes."""
    from megatron.core.comm import _flatten_pair, _pack, copy_wide_

    x = torch.randn(shape).to(dtype)
    src = x[index].movedim(0, 1)  # strided, not contiguous
    assert torch.equal(copy_wide_(torch.empty(src.shape, dtype=dtype), src), src)
    blocks = [src, src * 2]
    assert torch.equal(_pack(blocks, 1), torch.cat(blocks, 1))
    assert torch.equal(_flatten_pair(src, 0), src.flatten(0, 1))


def test_head_split_rules():
    """Ceil/floor query heads per rank (the first ranks get one more); each rank the K/V heads
    its query heads use; more ranks than heads refused."""
    from megatron.core.sequence.heads import check_heads_for_sp
    from megatron.errors import UsageError

    assert head_split(6, 6, 4).q_counts == (2, 2, 1, 1)
    assert head_split(7, 1, 4).kv_heads == ((0,), (0,), (0,), (0,))
    # rank 1 holds query heads 2 and 3, which use K/V heads 0 and 1
    assert head_split(6, 2, 4).kv_heads == ((0,), (0, 1), (1,), (1,))
    assert head_split(28, 28, 8).q_counts == (4,) * 4 + (3,) * 4
    assert head_split(40, 8, 8).kv_heads == tuple((r,) for r in range(8))
    assert head_split(40, 8, 8).even and not head_split(40, 8, 8).kv_replicated
    assert head_split(8, 2, 4).kv_index == (0, 0, 1, 1)
    # query heads 0-2 use K/V heads 0, 0, 1: not equal groups, so one copy per query head
    assert head_split(6, 3, 2).kv_heads == ((0, 0, 1), (1, 2, 2))
    with pytest.raises(UsageError, match="--ds-sequence-parallel-size 8 is larger than"):
        check_heads_for_sp(6, 6, 8)


def test_uneven_heads_log_line(caplog):
    from model_utils import tiny_config

    from megatron.model.parallelize import _log_uneven_heads

    config = tiny_config(num_attention_heads=6, hidden_size=48)
    with caplog.at_level("INFO", logger="megatron"):
        _log_uneven_heads(config, 4)
    assert [r.getMessage() for r in caplog.records] == [
        "> uneven heads over --ds-sequence-parallel-size 4: query heads per rank 2/2/1/1, K/V "
        "heads per rank 2/2/1/1; off (they need equal blocks per rank): the send-order QKV "
        "projection"
    ]
