"""Ring and Ulysses x ring attention equal one-process causal attention, forward and backward,
with GQA and packed documents; the load-balanced layout gives every rank equal work."""

import math

import pytest
import torch
from dist_helper import get_world

from megatron.core.sequence.ring import chunks_of_rank, load_balanced_order

S, B, H, D = 24, 2, 4, 8
DOC_LENGTHS = (5, 3, 11, 5)  # packed documents of one row (the other row: one document)

# (U, R, kv heads, documents, backend)
CASES = {
    2: [(1, 2, 4, False, "classic"), (1, 2, 1, True, "classic"), (1, 2, 2, False, "sdpa")],
    4: [
        (1, 4, 4, False, "classic"),
        (1, 4, 2, True, "classic"),
        (1, 4, 1, False, "sdpa"),
        (2, 2, 4, False, "classic"),
        (2, 2, 1, True, "classic"),
        (2, 2, 2, True, "sdpa"),
        (4, 1, 2, False, "classic"),
        (4, 1, 1, True, "classic"),
    ],
    6: [(2, 3, 2, False, "classic"), (2, 3, 1, True, "classic")],
}


def _reference(q, k, v, doc_ids):
    """Plain causal (and same-document) attention with GQA on the whole sequence."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    probs = scores.masked_fill(~allowed, -torch.inf).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v)


def _doc_ids() -> torch.Tensor:
    row = torch.cat([torch.full((n,), i) for i, n in enumerate(DOC_LENGTHS)])
    return torch.stack([row, torch.zeros(S, dtype=row.dtype)]).int()


def _check(cases):
    from megatron.core import parallel_state as ps
    from megatron.core.sequence.layer import DistributedAttention
    from megatron.core.sequence.ring import RingAttention
    from megatron.model.attention_backends import build_local_attention
    from megatron.model.attention_step import merge_

    out = []
    for n, (u, r, hkv, docs, backend) in enumerate(cases):
        state = ps.initialize_model_parallel(sequence_parallel_size=u, context_parallel_size=r)
        dtype = torch.float64 if backend == "classic" else torch.float32
        torch.manual_seed(100 + n)
        q = torch.randn(S, B, H, D, dtype=dtype)
        k, v = (torch.randn(S, B, hkv, D, dtype=dtype) for _ in range(2))
        dout = torch.randn(S, B, H, D, dtype=dtype)
        doc_ids = _doc_ids() if docs else None
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = _reference(*ref_in, doc_ids)
        (ref * dout).sum().backward()

        order = load_balanced_order(S, r)
        n_local = S // (u * r)
        mine = order[state.seq_rank * n_local : (state.seq_rank + 1) * n_local]
        local_in = [t[mine].clone().requires_grad_() for t in (q, k, v)]
        attn = build_local_attention(backend, attention_dropout=0.0, softmax_scale=D**-0.5)
        if r > 1:
            attn = RingAttention(attn, state.cp_group, merge_)
        if u > 1:
            attn = DistributedAttention(attn, state.sp_group)
        kw = {} if doc_ids is None else {"doc_ids": doc_ids[:, order]}
        got = attn(*local_in, **kw)
        (got * dout[mine]).sum().backward()
        errs = [(got - ref[mine]).abs().max().item()]
        errs += [(a.grad - b.grad[mine]).abs().max().item() for a, b in zip(local_in, ref_in)]
        out.append(max(errs))
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def errors():
    found = {}
    for world, cases in CASES.items():
        per_rank = get_world(world).run(_check, cases)
        for i, case in enumerate(cases):
            found[case] = max(r[i] for r in per_rank)
    return found


@pytest.mark.parametrize(
    "case",
    [c for cases in CASES.values() for c in cases],
    ids=lambda c: f"U{c[0]}xR{c[1]}-kv{c[2]}{'-docs' if c[3] else ''}-{c[4]}",
)
def test_matches_one_process_attention(errors, case):
    # The ring's classic step keeps float64; the classic module alone (R 1) scores in fp32.
    exact = case[4] == "classic" and case[1] > 1
    assert errors[case] <= (1e-10 if exact else 2e-5)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_every_rank_gets_equal_causal_work(cp):
    """Chunks i and 2R-1-i: every ring rank's queries see the same number of earlier keys."""
    seq = 16 * cp
    order = load_balanced_order(seq, cp)
    assert sorted(order.tolist()) == list(range(seq))
    per_rank = order.view(cp, -1)
    pairs = [int((shard + 1).sum()) for shard in per_rank]  # query at p sees p + 1 keys
    assert len(set(pairs)) == 1 and sum(pairs) == seq * (seq + 1) // 2
    c = seq // (2 * cp)
    for rank in range(cp):
        first, second = chunks_of_rank(rank, cp)
        assert per_rank[rank].tolist() == [*range(first * c, first * c + c),
                                           *range(second * c, second * c + c)]  # fmt: skip
