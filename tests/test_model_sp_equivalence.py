"""Ulysses SP = 2 and 4 give the single-device loss and (summed over SP) gradients.

Every rank of a gloo world builds the reference model (same seed, same weights), computes
the whole sequence's loss and gradients in-process with the plainest settings (classic
attention, no recompute, unchunked loss), then runs the case's model on its own slice of
the sequence. All cases of one world size run in ONE world call.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_helper import get_world
from model_utils import (
    LLAMA,
    SEQ,
    forward_loss,
    make_batch,
    reference_config,
    slice_batch,
    tiny_config,
)

from megatron.data.batch import pad_batch_for_sharding
from megatron.model import GPTModel

MQA = {**LLAMA, "num_key_value_heads": 1}
FULL_UNIFORM = {"recompute_granularity": "full", "recompute_method": "uniform"}
FULL_BLOCK = {
    "recompute_granularity": "full",
    "recompute_method": "block",
    "recompute_num_layers": 1,
}
SELECTIVE = {"recompute_granularity": "selective"}
SDPA = {"attention_backend": "sdpa"}
TRITON = {"attention_backend": "triton"}
DELAY_WGRAD = {"delay_wgrad_compute": True}
H6 = {"num_attention_heads": 6, "hidden_size": 48}

# (id, overrides, batch, packed documents[, sequence length])
CASES_SP2 = [
    ("gpt-classic", {}, 2, False),
    ("gpt-sdpa", SDPA, 2, False),
    ("llama-gqa2-classic", LLAMA, 2, False),
    ("llama-gqa2-sdpa", {**LLAMA, **SDPA}, 2, False),
    ("llama-mqa-classic-b1", MQA, 1, False),
    ("llama-mqa-sdpa", {**MQA, **SDPA}, 2, False),
    ("gpt-full-uniform", FULL_UNIFORM, 2, False),
    ("gpt-sdpa-full-block", {**SDPA, **FULL_BLOCK}, 2, False),
    ("llama-selective", {**LLAMA, **SELECTIVE}, 2, False),
    (
        "llama-sdpa-full-uniform2",
        {**LLAMA, **SDPA, **FULL_UNIFORM, "recompute_num_layers": 2},
        2,
        False,
    ),
    ("gpt-packed", {}, 2, True),
    ("llama-sdpa-packed", {**LLAMA, **SDPA}, 2, True),
    ("llama-mqa-packed-selective", {**MQA, **SELECTIVE}, 3, True),
    ("gpt-chunked24", {"loss_chunk_size": 24}, 2, False),
    (
        "llama-untied-chunked5",
        {**LLAMA, "untie_embeddings_and_output_weights": True, "loss_chunk_size": 5},
        2,
        True,
    ),
    ("gpt-rope-half", {"position_embedding_type": "rope", "rotary_percent": 0.5}, 2, False),
    ("llama-triton-packed", {**LLAMA, **TRITON}, 2, True),
    ("gpt-full-uniform-ckpt-in-cpu", {**FULL_UNIFORM, "checkpoint_in_cpu": True}, 2, False),
    ("gpt-sdpa-delay-wgrad", {**SDPA, **DELAY_WGRAD}, 2, False),
    # the local attention in square blocks (4 of 16 tokens; 2 of 32 under recompute)
    ("gpt-sdpa-blocks16", {**SDPA, "sdpa_block_size": 16}, 2, False),
    (
        "llama-sdpa-blocks32-selective",
        {**LLAMA, **SDPA, **SELECTIVE, "num_key_value_heads": 8, "sdpa_block_size": 32},
        2,
        False,
    ),
    # the fused add + norm (Triton interpreter), the output biases added inside it
    (
        "gpt-sdpa-fused-norm-delay-wgrad",
        {**SDPA, **DELAY_WGRAD, "fused_residual_norm": True},
        1,
        False,
    ),
    ("llama-mqa-delay-wgrad-full-uniform", {**MQA, **FULL_UNIFORM, **DELAY_WGRAD}, 2, True),
    # Learned positions + SP: Q/K/V projected in send order (rank_major_qkv), also with GQA.
    ("gpt-mqa-sdpa-packed", {"num_key_value_heads": 1, **SDPA}, 2, True),
    (
        "gpt-gqa2-nobias-delay-wgrad",
        {"num_key_value_heads": 2, "add_bias_linear": False, **DELAY_WGRAD},
        2,
        False,
    ),
]
CASES_SP2 += [
    # 3 K/V heads over 2 ranks (3 query heads each): a copy of a K/V head per query head,
    # the projection in send order with repeated rows
    ("gpt-h6-gqa3", {**H6, "num_key_value_heads": 3}, 2, False),
]
CASES_SP4 = [
    ("gpt-classic", {}, 2, False),
    ("llama-gqa2-sdpa", {**LLAMA, **SDPA}, 2, False),
    ("llama-mqa-full-uniform", {**MQA, **FULL_UNIFORM}, 2, False),
    ("gpt-sdpa-packed-selective", {**SDPA, **SELECTIVE}, 2, True),
    (
        "llama-packed-untied-chunked7-block",
        {**LLAMA, **FULL_BLOCK, "untie_embeddings_and_output_weights": True, "loss_chunk_size": 7},
        2,
        True,
    ),
    ("llama-block-ckpt-in-cpu", {**LLAMA, **FULL_BLOCK, "checkpoint_in_cpu": True}, 2, True),
    ("gpt-delay-wgrad-selective", {**SELECTIVE, **DELAY_WGRAD}, 2, False),
    ("gpt-sdpa-blocks16", {**SDPA, "sdpa_block_size": 16}, 2, False),
    ("gpt-gqa2-sdpa-full-uniform", {"num_key_value_heads": 2, **SDPA, **FULL_UNIFORM}, 2, False),
    ("gpt-gqa8-packed", {"num_key_value_heads": 8}, 1, True),
    # uneven heads: 6 (or 7) heads over 4 ranks, 2/2/1/1 per rank
    ("gpt-h6", H6, 2, False),
    (
        "gpt-h6-mqa-delay-wgrad-selective",
        {**H6, **DELAY_WGRAD, **SELECTIVE, "num_key_value_heads": 1},
        2,
        False,
    ),
    ("llama-h6-gqa2-sdpa-packed", {**LLAMA, **H6, **SDPA}, 2, True),
    (
        "llama-h6-full-uniform-chunked5",
        {**LLAMA, **H6, **FULL_UNIFORM, "loss_chunk_size": 5},
        2,
        False,
    ),
    (
        "gpt-h7",
        {"num_attention_heads": 7, "hidden_size": 56},
        1,
        False,
    ),
    # a sequence length that does not split over 4 ranks: padded, the padding out of the loss
    ("gpt-seq62", {}, 2, False, 62),
    ("llama-h6-seq61-packed", {**LLAMA, **H6}, 2, True, 61),
]


def _loss_and_grads(model: GPTModel, batch: dict, sp_group) -> tuple[float, dict]:
    loss = forward_loss(model, batch, sp_group)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        if sp_group is not None:
            dist.all_reduce(grad, group=sp_group)  # the training code's SUM over SP ranks
        grads[name] = grad
    return loss.item(), grads


def _run_cases(cases: list) -> list[dict]:
    from megatron.core import parallel_state as ps

    state = ps.initialize_model_parallel(sequence_parallel_size=dist.get_world_size())
    world, rank = dist.get_world_size(), state.sp_rank
    results = []
    for case_i, (_, overrides, batch_size, packed, *seq) in enumerate(cases):
        config = tiny_config(**overrides)
        torch.manual_seed(1000 + case_i)
        reference = GPTModel(reference_config(config))
        batch = make_batch(batch_size, seed=2000 + case_i, packed=packed, seq=(*seq, SEQ)[0])
        ref_loss, ref_grads = _loss_and_grads(reference, batch, None)

        model = GPTModel(config, state.sp_group)
        model.load_state_dict(reference.state_dict())
        local = slice_batch(pad_batch_for_sharding(batch, world), rank, world)
        loss, grads = _loss_and_grads(model, local, state.sp_group)

        grad_errs = {
            name: ((grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
            for name, g in ref_grads.items()
        }
        worst = max(grad_errs, key=grad_errs.get)
        results.append(
            {
                "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
                "worst_grad": (worst, grad_errs[worst]),
                "n_grads": len(grad_errs),
                "n_params": len(ref_grads),
            }
        )
    return results


@pytest.fixture(scope="module")
def results():
    out = {}
    for sp, cases in ((2, CASES_SP2), (4, CASES_SP4)):
        per_rank = get_world(sp).run(_run_cases, cases)
        for case_i, case in enumerate(cases):
            out[(sp, case[0])] = [r[case_i] for r in per_rank]
    return out


ALL = [(2, c[0]) for c in CASES_SP2] + [(4, c[0]) for c in CASES_SP4]


@pytest.mark.parametrize("key", ALL, ids=lambda k: f"sp{k[0]}-{k[1]}")
def test_loss_and_grads_match_single_device(results, key):
    for rank, r in enumerate(results[key]):
        assert r["loss_rel"] <= 1e-5, f"rank {rank}: loss differs by {r['loss_rel']:.2e}"
        name, err = r["worst_grad"]
        assert err <= 1e-5, f"rank {rank}: grad of {name} differs by {err:.2e} (relative)"
        assert r["n_grads"] == r["n_params"] > 0
