"""A run's losses do not depend on how the work is split (SP, DP, ZeRO stage)."""

import math

import pytest
import torch
from dist_helper import get_world
from train_utils import run_many

WORLD1 = ["", "--micro-batch-size 1"]
WORLD2 = [
    "--ds-sequence-parallel-size 2",
    "",  # DP 2: one micro-batch each instead of two accumulated
    "--ds-sequence-parallel-size 2 --zero-stage 1",
    "--zero-stage 2",
    "--zero-stage 2 --log-interval 4",  # most steps finished during the next one
    "--ds-sequence-parallel-size 2 --zero-stage 3",
    "--zero-stage 3 --checkpoint-activations",
    "--ds-sequence-parallel-size 2 --checkpoint-activations",
    "--ds-sequence-parallel-size 2 --zero-stage 3 --checkpoint-activations --checkpoint-in-cpu",
    "--ds-sequence-parallel-size 2 --zero-stage 3 --delay-wgrad-compute",
]
# The same runs with the first all-gathers after the optimizer step instead of during it.
LATE_GATHER = " --no-overlap-param-gather-with-optimizer-step"
EARLY_GATHER_PAIRS = [(2, len(WORLD2)), (5, len(WORLD2) + 1)]
WORLD2 += [WORLD2[2] + LATE_GATHER, WORLD2[5] + LATE_GATHER]
# bf16: ZeRO gathers the layers' weights in bf16 (default) or fp32 (--fp32-param-gather).
WORLD2_BF16 = [
    "--bf16",
    "--bf16 --zero-stage 1",
    "--bf16 --zero-stage 1 --fp32-param-gather",
    "--bf16 --ds-sequence-parallel-size 2 --zero-stage 3",
    "--bf16 --ds-sequence-parallel-size 2 --zero-stage 1 --delay-wgrad-compute",
]
WORLD4 = [
    "--ds-sequence-parallel-size 2",
    "--ds-sequence-parallel-size 2 --zero-stage 3",
    "--ds-sequence-parallel-size 4",
]


@pytest.fixture(scope="module")
def losses():
    out = {}
    out[1] = get_world(1).run(run_many, WORLD1)[0]
    out[2] = get_world(2).run(run_many, WORLD2)
    out["bf16"] = get_world(2).run(run_many, WORLD2_BF16)
    out[4] = get_world(4).run(run_many, WORLD4)
    return out


def assert_same_losses(run, ref):
    assert len(run) == len(ref) == 10
    assert math.isclose(run[0], ref[0], rel_tol=1e-6), (run[0], ref[0])
    for a, b in zip(run, ref):
        assert math.isclose(a, b, rel_tol=1e-4), (run, ref)


def test_accumulation_matches(losses):
    ref = losses[1][0]
    assert all(math.isfinite(x) for x in ref)
    # Accumulating 4 micro-batches of 1 equals 2 micro-batches of 2.
    assert_same_losses(losses[1][1], ref)


@pytest.mark.parametrize("i", range(len(WORLD2)), ids=lambda i: WORLD2[i] or "dp2")
def test_world2_matches_world1(losses, i):
    for rank_losses in losses[2]:
        assert_same_losses(rank_losses[i], losses[1][0])


@pytest.mark.parametrize("early,late", EARLY_GATHER_PAIRS)
def test_gather_during_optimizer_step_changes_nothing(losses, early, late):
    """The optimizer updates the embeddings and first layer first and their all-gathers run
    while it updates the rest: every parameter's update is unchanged, so the run is too."""
    for rank_losses in losses[2]:
        assert rank_losses[early] == rank_losses[late]


@pytest.mark.parametrize("i", range(len(WORLD4)), ids=lambda i: WORLD4[i])
def test_world4_matches_world1(losses, i):
    for rank_losses in losses[4]:
        assert_same_losses(rank_losses[i], losses[1][0])


def test_bf16_zero_matches_zero0(losses):
    """Gathering bf16 layer weights rounds only what autocast did not already round (the
    norms' weights, their gradients): a bf16-level difference. The fp32 gather is the old
    path: the same as ZeRO 0 up to the order of the gradient sums."""
    for ref, bf16_gather, fp32_gather, zero3, delayed_wgrad in losses["bf16"]:
        assert len(ref) == 10 and all(math.isfinite(x) for x in ref)
        for a, b in zip(fp32_gather, ref):
            assert math.isclose(a, b, rel_tol=1e-4), (fp32_gather, ref)
        for run in (bf16_gather, zero3, delayed_wgrad):
            assert run[0] == pytest.approx(ref[0], rel=1e-6), (run, ref)
            for a, b in zip(run, ref):
                assert math.isclose(a, b, rel_tol=1e-3), (run, ref)


def _zero_dtypes(zero: int, param_dtype) -> dict:
    """ZeRO ``zero`` under bf16 autocast: the dtypes the layers compute with, of the stored
    parameters and of their gradients, after one forward and backward."""
    from model_utils import make_batch, slice_batch, tiny_config
    from torch.distributed.tensor import DTensor

    from megatron.core import parallel_state
    from megatron.core.distributed.fsdp import shard_model_for_zero
    from megatron.model import GPTModel, ParallelTransformerLayer

    state = parallel_state.initialize_model_parallel(device_type="cpu")
    torch.manual_seed(0)
    model = GPTModel(tiny_config(attention_backend="sdpa"))
    shard_model_for_zero(model, zero, state, (ParallelTransformerLayer,), param_dtype)
    seen: dict[str, set] = {"layers": set(), "root": set()}

    def record(where):
        return lambda module, inputs, output: seen[where].update(
            p.dtype for p in module.parameters(recurse=False)
        )

    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_hook(record("layers" if ".layers." in name else "root"))
    batch = slice_batch(make_batch(2, 0, seq=64), state.dp_rank, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch["tokens"], batch["position_ids"], labels=batch["labels"]).sum()
    loss.backward()
    params = list(model.parameters())
    return {
        **{k: sorted(map(str, v)) for k, v in seen.items()},
        "sharded": all(isinstance(p, DTensor) for p in params),
        "params": sorted({str(p.dtype) for p in params}),
        "grads": sorted({str(p.grad.dtype) for p in params if p.grad is not None}),
        "grads_sharded": all(isinstance(p.grad, DTensor) for p in params),
    }


@pytest.mark.parametrize("zero", [1, 3])
def test_zero_gathers_layers_in_bf16(zero):
    world = get_world(2)
    bf16 = torch.bfloat16
    for rank_result in world.run(_zero_dtypes, zero, bf16):
        assert rank_result == {
            "layers": ["torch.bfloat16"], "root": ["torch.float32"], "sharded": True,
            "params": ["torch.float32"], "grads": ["torch.float32"], "grads_sharded": True,
        }  # fmt: skip
    for rank_result in world.run(_zero_dtypes, zero, None):  # --fp32-param-gather
        assert rank_result["layers"] == ["torch.float32"] == rank_result["grads"]


def _fused_norm_under_zero(zero: int, fused: bool) -> tuple[float, dict]:
    """Loss and full gradients of one forward and backward of the tiny GPT under ZeRO
    ``zero``, with the residual add + norm fused (the output biases added in that pass, the
    MLP's by the next layer's norm) or not."""
    from model_utils import make_batch, slice_batch, tiny_config

    from megatron.core import parallel_state
    from megatron.core.distributed.fsdp import shard_model_for_zero
    from megatron.model import GPTModel, ParallelTransformerLayer

    state = parallel_state.initialize_model_parallel(device_type="cpu")
    torch.manual_seed(0)
    model = GPTModel(tiny_config(fused_residual_norm=fused, seq_length=16))
    shard_model_for_zero(model, zero, state, (ParallelTransformerLayer,), None)
    batch = slice_batch(make_batch(2, 0, seq=16), state.dp_rank, 2)
    loss = model(batch["tokens"], batch["position_ids"], labels=batch["labels"]).sum()
    loss.backward()
    return loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def test_fused_norm_biases_under_zero3():
    """ZeRO 3 frees a layer's gathered weights after its forward, before the next layer's
    fused add + norm adds this layer's MLP bias: the result must not depend on that."""
    world = get_world(2)
    for (loss, grads), (ref_loss, ref_grads) in zip(
        world.run(_fused_norm_under_zero, 3, True), world.run(_fused_norm_under_zero, 3, False)
    ):
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def _zero1_two_micro_batches(fp32_wgrad: bool, param_dtype) -> tuple[list, dict]:
    """ZeRO 1, SP 2, bf16 autocast, delayed weight gradients, a step of two micro-batches:
    the dtypes of a delayed weight's and the Q/K/V weight's gradients after the first, and
    the step's full gradients."""
    from model_utils import forward_loss, make_batch, slice_batch, tiny_config

    from megatron.core import parallel_state
    from megatron.core.distributed.fsdp import shard_model_for_zero
    from megatron.model import GPTModel, ParallelTransformerLayer
    from megatron.model.parallelize import set_micro_batch_sync

    state = parallel_state.initialize_model_parallel(sequence_parallel_size=2, device_type="cpu")
    torch.manual_seed(0)
    model = GPTModel(tiny_config(delay_wgrad_compute=True), sp_group=state.sp_group)
    shard_model_for_zero(model, 1, state, (ParallelTransformerLayer,), param_dtype)
    layer = model.transformer.layers[0]
    weights = (layer.mlp.dense_h_to_4h, layer.self_attention.query_key_value)
    after_first = None
    for micro in range(2):
        set_micro_batch_sync(model, 1, last=micro == 1, fp32_wgrad=fp32_wgrad)
        batch = slice_batch(make_batch(2, micro), state.sp_rank, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_loss(model, batch, state.sp_group)
        (loss / 2).backward()
        if micro == 0:
            after_first = [
                str(m.weight.grad if m.weight.grad is None else m.weight.grad.dtype)
                for m in weights
            ]
    return after_first, {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def test_zero1_accumulates_delayed_weight_gradients_in_fp32():
    """Gradient accumulation fusion: under ZeRO 1 over micro-batches the delayed weight-
    gradient GEMMs write fp32 gradients (FSDP2 keeps them as they are) instead of bf16 ones
    that FSDP2 casts and adds; the step's gradients agree with those and the fp32 gather's."""
    world = get_world(2)
    fused = world.run(_zero1_two_micro_batches, True, torch.bfloat16)
    plain = world.run(_zero1_two_micro_batches, False, torch.bfloat16)
    fp32_gather = world.run(_zero1_two_micro_batches, True, None)
    for (dtype, grads), (plain_dtype, plain_grads), (_, ref) in zip(fused, plain, fp32_gather):
        # The Q/K/V projection's gradient is left to autograd and FSDP2 either way.
        assert dtype == ["torch.float32", "None"]
        assert plain_dtype == ["None", "None"]  # FSDP2 took the bf16 one to cast and add
        for name, want in ref.items():
            assert grads[name].dtype == plain_grads[name].dtype == torch.float32
            scale = want.norm().clamp_min(1e-12)
            assert (grads[name] - want).norm() / scale < 2e-2, name
            assert (plain_grads[name] - want).norm() / scale < 2e-2, name
