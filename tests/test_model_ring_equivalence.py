"""Ulysses x ring (U x R ranks over one sequence) gives the single-device loss and (summed
over the sequence's ranks) gradients, for GPT-3 and Llama styles.

Same method as test_model_sp_equivalence.py: every rank computes the reference in-process,
then runs the case's model on its load-balanced shard. One world call per world size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_helper import get_world
from model_utils import LLAMA, forward_loss, make_batch, reference_config, slice_batch, tiny_config

from megatron.model import GPTModel

MQA = {**LLAMA, "num_key_value_heads": 1}
SDPA = {"attention_backend": "sdpa"}
SELECTIVE = {"recompute_granularity": "selective"}
FULL = {"recompute_granularity": "full", "recompute_method": "uniform"}

# (id, U, R, overrides, batch, packed documents)
CASES = {
    2: [("llama-sdpa-packed", 1, 2, {**LLAMA, **SDPA}, 2, True)],
    4: [
        ("gpt-classic-selective", 2, 2, SELECTIVE, 2, False),
        ("gpt-sdpa-packed-chunked", 2, 2, {**SDPA, "loss_chunk_size": 24}, 2, True),
        ("llama-mqa-packed-full", 2, 2, {**MQA, **FULL}, 2, True),
        ("llama-gqa2-ring4-packed", 1, 4, LLAMA, 2, True),
    ],
}


def _run(cases: list) -> list[dict]:
    from megatron.core import parallel_state as ps
    from megatron.data.batch import load_balance_for_context_parallel

    results = []
    for case_i, (_, u, r, overrides, batch_size, packed) in enumerate(cases):
        state = ps.initialize_model_parallel(sequence_parallel_size=u, context_parallel_size=r)
        config = tiny_config(**overrides)
        torch.manual_seed(1000 + case_i)
        reference = GPTModel(reference_config(config))
        batch = make_batch(batch_size, seed=2000 + case_i, packed=packed)
        ref_loss = forward_loss(reference, batch)
        ref_loss.backward()

        sp_group = state.sp_group if u > 1 else None
        model = GPTModel(config, sp_group, cp_group=state.cp_group)
        model.load_state_dict(reference.state_dict())
        local = slice_batch(load_balance_for_context_parallel(batch, r), state.seq_rank, u * r)
        loss = forward_loss(model, local, state.seq_group)
        loss.backward()
        errs = {}
        for (name, p), ref_p in zip(model.named_parameters(), reference.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad, group=state.seq_group)  # the training code's sum
            errs[name] = ((grad - ref_p.grad).norm() / ref_p.grad.norm().clamp_min(1e-30)).item()
        worst = max(errs, key=errs.get)
        results.append(
            {
                "loss_rel": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
                "worst_grad": (worst, errs[worst]),
            }  # fmt: skip
        )
        ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def results():
    out = {}
    for world, cases in CASES.items():
        per_rank = get_world(world).run(_run, cases)
        for i, case in enumerate(cases):
            out[(world, case[0])] = [r[i] for r in per_rank]
    return out


@pytest.mark.parametrize(
    "key", [(w, c[0]) for w, cases in CASES.items() for c in cases], ids=lambda k: f"{k[0]}-{k[1]}"
)
def test_loss_and_grads_match_single_device(results, key):
    for rank, r in enumerate(results[key]):
        assert r["loss_rel"] <= 1e-5, f"rank {rank}: loss differs by {r['loss_rel']:.2e}"
        name, err = r["worst_grad"]
        assert err <= 1e-5, f"rank {rank}: grad of {name} differs by {err:.2e} (relative)"
