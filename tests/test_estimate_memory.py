"""megatron.planning.memory_model against tensor-level measurements of tiny CPU runs.

A TorchDispatchMode records every storage created while a model is built, run forward and
backward and stepped by AdamW, and sums the live ones (at their current size: FSDP2 frees
by resizing storages; DTensors count their local shard). Saved activations must match the
model within 10%, parameters/gradients/optimizer states exactly, and the predicted peak
must be within -5%/+15% of the measured one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time

import pytest
import torch
from model_utils import LLAMA, make_batch, slice_batch, tiny_config
from torch.distributed.tensor import DTensor

from megatron.errors import UsageError
from megatron.model import GPTModel, parameter_counts
from megatron.optimizer.optimizer import param_groups
from megatron.planning import memory_model as mm
from megatron.planning.memory_tracker import LiveBytes


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _setup(bf16: bool, batch: int, **kw) -> mm.RunSetup:
    return mm.RunSetup(
        micro_batch_size=batch, precision="bf16" if bf16 else "fp32", device="cpu", **kw
    )


def _loss(model, batch):
    """As training calls the model: with the loss mask (the chunked loss's gradients come out
    of its forward pass)."""
    tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
    return model(tokens, positions, labels=labels, loss_mask=batch["loss_mask"]).masked_sum


def measure_saved(config, bf16: bool, batch_size: int = 2, sp_group=None, rank=0, world=1) -> int:
    """Bytes that forward leaves alive (saved for backward), parameters excluded."""
    torch.manual_seed(0)
    model = GPTModel(config, sp_group=sp_group)
    batch = slice_batch(make_batch(batch_size, 0, seq=config.seq_length), rank, world)
    mode = LiveBytes(exclude=list(model.parameters()))
    with mode:
        with _autocast(bf16):
            loss = _loss(model, batch)
        # gloo's worker thread lets go of a finished collective's tensors a moment after
        # wait() returns; without this pause the last all-to-all's buffers were sometimes
        # counted as saved (1 run in 25 of the ZeRO 3 SP 2 case).
        time.sleep(0.05)
        held = mode.current()
        loss.backward()
    return held


def predicted_saved(config, setup) -> int:
    act = mm.saved_activation_bytes(config, setup)
    return act["layers"] + act["final"] + act["shared"] + mm.lowp_saved_bytes(config, setup)


def measure_iteration(
    config, bf16: bool, batch_size: int, shard=None, sp_group=None, rank=0, micro=1, sync=None
):
    """Two training iterations of ``micro`` micro-batches each (``sync(model, last)`` before
    each backward); returns (peak bytes of the second, model, optimizer)."""
    torch.manual_seed(0)
    world = 1 if sp_group is None else torch.distributed.get_world_size(sp_group)
    batch = slice_batch(make_batch(batch_size, 0, seq=config.seq_length), rank, world)
    mode = LiveBytes()
    # Only reference counting frees tensors while measuring: a garbage collection at some
    # allocation count would free a cycle's tensors earlier in one run than in another.
    gc.collect()
    gc.disable()
    try:
        with mode:
            model = GPTModel(config, sp_group=sp_group)
            if shard is not None:
                model = shard(model)
            opt = torch.optim.AdamW(param_groups(model), lr=1e-3, foreach=True)
            for it in range(2):
                opt.zero_grad(set_to_none=True)
                if it == 1:
                    mode.reset_peak()
                for m in range(micro):
                    if sync is not None:
                        sync(model, m == micro - 1)
                    with _autocast(bf16):
                        loss = _loss(model, batch)
                    loss.backward()
                opt.step()
    finally:
        gc.enable()
    return mode.peak, model, opt


CONFIGS = {
    "gpt-classic": ({}, False),
    "gpt-sdpa": ({"attention_backend": "sdpa"}, False),
    "gpt-sdpa-bf16": ({"attention_backend": "sdpa"}, True),
    "gpt-classic-bf16-gqa": ({"num_key_value_heads": 2}, True),
    "llama-sdpa": ({**LLAMA, "attention_backend": "sdpa", "loss_chunk_size": 32}, False),
    "llama-sdpa-bf16-loss-recompute": (
        {
            **LLAMA,
            "attention_backend": "sdpa",
            "loss_chunk_size": 32,
            "loss_grad_in_forward": False,
        },
        True,
    ),
    "llama-sdpa-bf16": ({**LLAMA, "attention_backend": "sdpa"}, True),
    "full-recompute": ({"attention_backend": "sdpa", "recompute_granularity": "full"}, False),
    "full-recompute-bf16": (
        {"attention_backend": "sdpa", "recompute_granularity": "full", "loss_chunk_size": 32},
        True,
    ),
    "full-recompute-bf16-fp32-residual": (
        {
            "attention_backend": "sdpa",
            "recompute_granularity": "full",
            "loss_chunk_size": 32,
            "fp32_residual_connection": True,
        },
        True,
    ),
    "llama-sdpa-bf16-fp32-residual": (
        {**LLAMA, "attention_backend": "sdpa", "fp32_residual_connection": True},
        True,
    ),
    "full-block": (
        {
            "num_layers": 4,
            "attention_backend": "sdpa",
            "recompute_granularity": "full",
            "recompute_method": "block",
            "recompute_num_layers": 2,
        },
        False,
    ),
    "selective-classic": ({"recompute_granularity": "selective", "loss_chunk_size": 32}, False),
    "dropout-classic": ({"hidden_dropout": 0.1, "attention_dropout": 0.1}, False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_activations_match_measurement(name):
    overrides, bf16 = CONFIGS[name]
    config = tiny_config(**overrides)
    measured = measure_saved(config, bf16)
    predicted = predicted_saved(config, _setup(bf16, 2))
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


def test_recompute_full_keeps_only_group_inputs():
    base = tiny_config(num_layers=4, attention_backend="sdpa", loss_chunk_size=32)
    none = mm.saved_activation_bytes(base, _setup(True, 1))
    full = mm.saved_activation_bytes(
        dataclasses.replace(base, recompute_granularity="full", recompute_num_layers=2),
        _setup(True, 1),
    )
    n, h = base.seq_length, base.hidden_size
    assert full["layers"] == 2 * 2 * n * h  # two groups, each keeps its bf16 input
    assert none["layers"] == 4 * none["per_layer"] > full["layers"]
    fp32_residual = dataclasses.replace(
        base, recompute_granularity="full", recompute_num_layers=2, fp32_residual_connection=True
    )
    assert mm.saved_activation_bytes(fp32_residual, _setup(True, 1))["layers"] == 2 * 4 * n * h


def test_checkpoint_in_cpu_moves_group_inputs_off_the_gpu():
    config = tiny_config(
        num_layers=6, attention_backend="sdpa", loss_chunk_size=32, seq_length=4096,
        recompute_granularity="full", recompute_num_layers=2,
    )  # fmt: skip
    offloaded = dataclasses.replace(config, checkpoint_in_cpu=True)
    gpu = mm.RunSetup(micro_batch_size=1, precision="bf16", device="cuda")
    cpu = _setup(True, 1)
    assert mm.saved_activation_bytes(offloaded, gpu)["layers"] == 0
    # On a CPU run the host is the device: nothing moves.
    assert mm.saved_activation_bytes(offloaded, cpu) == mm.saved_activation_bytes(config, cpu)
    n, h = config.seq_length, config.hidden_size
    saved_on_gpu = mm.estimate_memory(config, gpu).total - mm.estimate_memory(offloaded, gpu).total
    # In backward two groups' inputs are on the GPU (one fetched ahead): one of three saved.
    assert 0 < saved_on_gpu <= 3 * 4 * n * h
    assert mm.estimate_memory(offloaded, gpu).host == 3 * 2 * n * h  # bf16 inputs, on the host
    assert mm.estimate_memory(config, gpu).host == 0


@pytest.mark.parametrize("overrides", [{}, LLAMA, {"untie_embeddings_and_output_weights": True}])
def test_parameter_shapes_match_model(overrides):
    config = tiny_config(**overrides)
    model = GPTModel(config, device="meta")
    real = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert mm.parameter_shapes(config) == real
    assert sum(map(mm._numel, real.values())) == parameter_counts(config)["total"]


@pytest.mark.parametrize("name", ["gpt-sdpa", "llama-sdpa"])
def test_params_grads_optimizer_exact(name):
    overrides, bf16 = CONFIGS[name]
    config = tiny_config(**overrides)
    _, model, opt = measure_iteration(config, bf16, 2)
    est = mm.estimate_memory(config, _setup(bf16, 2))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    states = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert params == est.params
    assert grads == 4 * est.details["params_per_gpu"]
    assert states == est.optimizer


@pytest.mark.parametrize(
    "name",
    [
        "gpt-sdpa",
        "gpt-sdpa-bf16",
        "llama-sdpa",
        "llama-sdpa-bf16-loss-recompute",
        "full-recompute-bf16",
        "full-block",
    ],
)
def test_peak_matches_measurement(name):
    overrides, bf16 = CONFIGS[name]
    config = tiny_config(**overrides)
    peak, _, _ = measure_iteration(config, bf16, 2)
    est = mm.estimate_memory(config, _setup(bf16, 2))
    assert 0.95 * peak <= est.total <= 1.15 * peak, (est.total, peak, est.peak_phase)


def _two_rank_case(
    overrides: dict, zero: int, sp: int, bf16: bool, fp32_gather: bool = False, micro: int = 1
):
    """On each of 2 gloo ranks: measured vs predicted saved bytes, params, optimizer, peak.

    The saved bytes are measured on the unsharded model (ZeRO 0); the peak on the sharded one,
    whose layers all-gather bf16 weights under bf16 unless ``fp32_gather``."""
    from megatron.core import parallel_state
    from megatron.core.distributed.fsdp import shard_model_for_zero
    from megatron.model import ParallelTransformerLayer
    from megatron.model.parallelize import set_micro_batch_sync

    config = tiny_config(**overrides)
    state = parallel_state.initialize_model_parallel(sequence_parallel_size=sp, device_type="cpu")
    group = state.sp_group if sp > 1 else None
    saved = measure_saved(config, bf16, sp_group=group, rank=state.sp_rank, world=sp)

    param_dtype = torch.bfloat16 if bf16 and not fp32_gather else None

    def shard(model):
        return shard_model_for_zero(model, zero, state, (ParallelTransformerLayer,), param_dtype)

    def sync(model, last):
        set_micro_batch_sync(model, zero, last)

    peak, model, opt = measure_iteration(
        config, bf16, 2, shard, group, state.sp_rank, micro, sync if micro > 1 else None
    )

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    params = sum(local(p).numel() * 4 for p in model.parameters())
    states = sum(
        local(v).numel() * v.element_size() for st in opt.state.values() for v in st.values()
    )
    setup = _setup(
        bf16, 2, num_gpus=2, sp=sp, zero_stage=zero, fp32_param_gather=fp32_gather,
        num_micro_batches=micro,
    )  # fmt: skip
    est = mm.estimate_memory(config, setup)
    return {
        "saved": (saved, predicted_saved(config, dataclasses.replace(setup, zero_stage=0))),
        "params": (params, est.params),
        "optimizer": (states, est.optimizer),
        "peak": (peak, est.total),
    }


TWO_RANK = [
    ({"attention_backend": "sdpa"}, 0, 2, False),
    # bf16 under ZeRO: layers gathered in bf16 (the default), then in fp32 as before.
    ({"attention_backend": "sdpa", "loss_chunk_size": 32}, 1, 2, True),
    ({"attention_backend": "sdpa", "loss_chunk_size": 32}, 1, 2, True, True),
    ({"attention_backend": "sdpa", "delay_wgrad_compute": True}, 0, 2, True),
    # ZeRO 1 over 2 micro-batches: gradients wait unsharded (fp32) for the last one.
    ({"attention_backend": "sdpa", "loss_chunk_size": 32}, 1, 2, True, False, 2),
    ({"num_layers": 4, "attention_backend": "sdpa", "loss_chunk_size": 32}, 1, 1, False, False, 2),
    ({**LLAMA, "num_layers": 4, "attention_backend": "sdpa", "loss_chunk_size": 32}, 3, 1, True),
    ({**LLAMA, "num_key_value_heads": 1, "attention_backend": "sdpa"}, 0, 2, True),
    ({"attention_backend": "sdpa", "loss_chunk_size": 32}, 1, 2, False),
    ({"num_layers": 4, "attention_backend": "sdpa", "loss_chunk_size": 32}, 3, 1, False),
    (
        {"num_layers": 4, "attention_backend": "sdpa", "recompute_granularity": "full"},
        3,
        2,
        False,
    ),
]


def test_sp_and_zero_on_two_ranks():
    from dist_helper import get_world

    world = get_world(2)
    for overrides, zero, sp, bf16, *rest in TWO_RANK:
        results = world.run(_two_rank_case, overrides, zero, sp, bf16, *rest)
        for rank, res in enumerate(results):
            where = f"{overrides} ZeRO {zero} SP {sp} bf16={bf16} {rest} rank {rank}"
            measured, predicted = res["saved"]
            assert predicted == pytest.approx(measured, rel=0.10), (where, res)
            # FSDP2 pads dim 0 to a multiple of the world: the prediction is rank 0's size.
            assert res["params"][0] <= res["params"][1], (where, res)
            assert res["optimizer"][0] <= res["optimizer"][1], (where, res)
            if rank == 0:
                assert res["params"][0] == res["params"][1], (where, res)
                assert res["optimizer"][0] == res["optimizer"][1], (where, res)
            peak, est = res["peak"]
            # The peak of a ZeRO case moved by up to 6% between identical runs, also with the
            # garbage collector off; most likely when gloo's threads finish FSDP's collectives
            # (and their buffers are freed) varies. The GPU runs stay within 1% of the model.
            low = 0.95 if zero == 0 else 0.90
            assert low * peak <= est <= 1.15 * peak, (where, res)


def test_bf16_layer_gather_halves_unsharded_layers():
    """ZeRO + bf16: layers' unsharded weights take 2 bytes and have no autocast copies; the
    root stays fp32 and keeps its output-layer copy; --fp32-param-gather is the old model."""
    config = tiny_config(num_layers=4, attention_backend="sdpa", loss_chunk_size=0)
    lowp = mm.RunSetup(num_gpus=2, zero_stage=1)
    fp32 = dataclasses.replace(lowp, fp32_param_gather=True)
    assert lowp.lowp_layer_params and not fp32.lowp_layer_params
    assert not dataclasses.replace(lowp, zero_stage=0).lowp_layer_params
    assert not dataclasses.replace(lowp, precision="fp32").lowp_layer_params
    assert mm.lowp_weight_bytes(config, lowp) == 0 < mm.lowp_weight_bytes(config, fp32)
    out_copy = mm.output_weight_copy_bytes(config, lowp)
    assert mm.lowp_saved_bytes(config, lowp) == out_copy > 0
    z = mm._zero_bytes(config, lowp)
    a, b = mm.estimate_memory(config, lowp), mm.estimate_memory(config, fp32)
    assert b.details["phases"]["end of forward (loss)"] - a.details["phases"][
        "end of forward (loss)"
    ] == 2 * 4 * z["per_layer"] + mm.lowp_weight_bytes(config, fp32)
    assert a.total < b.total


def test_more_sp_less_memory_and_find_min_sp():
    config = tiny_config(num_layers=4, seq_length=4096, attention_backend="sdpa")
    setup = mm.RunSetup(num_gpus=8, micro_batch_size=1, zero_stage=3)
    totals = [
        mm.estimate_memory(config, dataclasses.replace(setup, sp=sp)).total for sp in (1, 2, 4, 8)
    ]
    assert totals == sorted(totals, reverse=True)
    budget = (totals[1] + totals[2]) // 2  # SP 4 fits, SP 2 does not
    best, tried = mm.find_min_sp(config, setup, budget)
    assert best == 4 and [sp for sp, _ in tried] == [1, 2, 4]
    assert mm.find_min_sp(config, setup, 1)[0] is None
    assert mm.valid_sp_degrees(tiny_config(num_key_value_heads=2), 8) == [1, 2, 4, 8]


def test_bad_setup_is_a_usage_error():
    with pytest.raises(UsageError, match="--ds-sequence-parallel-size 3 must divide"):
        mm.RunSetup(num_gpus=4, sp=3)
    with pytest.raises(UsageError, match="--zero-stage"):
        mm.RunSetup(zero_stage=4)
    with pytest.raises(UsageError, match="--ds-sequence-parallel-size 128 is larger than"):
        mm.estimate_memory(tiny_config(), mm.RunSetup(num_gpus=128, sp=128))


def test_uneven_heads_and_padded_sequence():
    """6 heads over 4 ranks: the ranks with 2 heads set the all-to-all's buffers (as 8 heads
    would); a sequence of 62 tokens over 4 ranks is computed as 64."""
    six = tiny_config(num_attention_heads=6, hidden_size=48)
    setup = mm.RunSetup(num_gpus=4, sp=4)
    assert mm._dims(six, setup)["x"] == mm._dims(tiny_config(), setup)["x"]
    est = mm.estimate_memory(six, setup)
    padded = mm.estimate_memory(dataclasses.replace(six, seq_length=62), setup)
    assert padded.tokens_per_gpu == est.tokens_per_gpu == 64 // 4
    assert padded.total == est.total
    assert mm.valid_sp_degrees(six, 8) == [1, 2, 4]


def test_cli(tmp_path, capsys):
    import json

    from tools.estimate_memory import main

    common = [
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
        "--seq-length", "8192", "--vocab-size", "1000", "--bf16", "--use-flash-attn",
        "--num-gpus", "4", "--zero-stage", "3", "--recompute-granularity", "none",
    ]  # fmt: skip
    out = tmp_path / "est.json"
    assert main([*common, "--ds-sequence-parallel-size", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SP 2 x DP 2, ZeRO 3, bf16, 4096 tokens per GPU" in text and "| **total" in text
    data = json.loads(out.read_text())
    assert data["estimates_by_sp"]["2"]["tokens_per_gpu"] == 4096
    assert main([*common, "--find-sp", "--gpu-memory-gb", "0.2", "--reserve-gb", "0"]) == 0
    assert "smallest split that fits: Ulysses 4 x ring 1" in capsys.readouterr().out
    # Ulysses capped at 2 GPUs per node: the ring takes the rest.
    find = [*common, "--find-sp", "--gpu-memory-gb", "0.2", "--reserve-gb", "0"]
    assert main([*find, "--gpus-per-node", "2", "--json", str(out)]) == 0
    assert "smallest split that fits: Ulysses 2 x ring 2" in capsys.readouterr().out
    assert json.loads(out.read_text())["estimates_by_sp"]["2x2"]["tokens_per_gpu"] == 2048
    assert main([*common, "--ds-sequence-parallel-size", "2", "--context-parallel-size", "2",
                 "--attention-dropout", "0"]) == 0  # fmt: skip
    assert "SP 2 x CP 2 x DP 1, ZeRO 3, bf16, 2048 tokens per GPU" in capsys.readouterr().out
    no_vocab = [a for a in common if a not in ("--vocab-size", "1000")]
    assert main(no_vocab) == 2
    assert "--padded-vocab-size" in capsys.readouterr().err


def test_ring_splits_the_tokens_and_adds_its_buffers():
    """U x R shards the tokens U x R ways; the ring's K/V block and fp32 dK/dV accumulators
    are in the attention workspace; splits are ordered by degree, Ulysses first."""
    config = tiny_config(attention_backend="sdpa")
    ulysses = mm.estimate_memory(config, mm.RunSetup(num_gpus=4, sp=4))
    hybrid = mm.estimate_memory(config, mm.RunSetup(num_gpus=4, sp=2, cp=2))
    ring = mm.estimate_memory(config, mm.RunSetup(num_gpus=4, cp=4))
    assert ulysses.tokens_per_gpu == hybrid.tokens_per_gpu == ring.tokens_per_gpu == 16
    work = [e.details["layer_backward"]["attention_workspace"] for e in (ulysses, hybrid, ring)]
    assert work[0] < work[1] == work[2]  # the same tokens and heads per rank: the same buffers
    splits = mm.valid_sequence_splits(config, 8)
    assert splits[:4] == [(1, 1), (2, 1), (1, 2), (4, 1)]
    assert (8, 1) in splits and (2, 4) in splits
    assert max(u for u, _ in mm.valid_sequence_splits(config, 8, max_ulysses=2)) == 2
    with pytest.raises(UsageError, match="x --context-parallel-size 3 must divide"):
        mm.RunSetup(num_gpus=4, sp=2, cp=3)
