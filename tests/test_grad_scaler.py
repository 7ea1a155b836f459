"""Loss scaling follows Megatron's rules; unscaling finds inf/nan and divides finite grads."""

import json

import pytest
import torch
from dist_helper import get_world

from megatron.errors import UsageError
from megatron.optimizer import grad_scaler
from megatron.optimizer.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    non_finite_check_and_unscale_,
)


def unscale_and_check_(grads, inv_scale) -> bool:
    """Bool form of ``non_finite_check_and_unscale_`` (syncs with the device once)."""
    return bool(non_finite_check_and_unscale_(grads, inv_scale).item() > 0)


def dynamic(initial=2.0**16, min_scale=1.0, window=3, hysteresis=2) -> DynamicGradScaler:
    return DynamicGradScaler(
        initial_scale=initial,
        min_scale=min_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=window,
        hysteresis=hysteresis,
    )


def test_hysteresis_two_halves_on_second_overflow_then_every_overflow():
    s = dynamic(initial=1024.0)
    s.update(True)
    assert s.scale == 1024.0  # first overflow: step skipped, scale kept
    s.update(True)
    assert s.scale == 512.0  # second overflow: halved
    s.update(True)
    assert s.scale == 256.0  # hysteresis spent: every overflow halves
    assert s.inv_scale == 1.0 / 256.0


def test_clean_step_alone_does_not_restore_hysteresis():
    # Megatron: only a full clean window restores the hysteresis tracker.
    s = dynamic(initial=1024.0, window=3)
    s.update(True)
    s.update(False)
    s.update(True)
    assert s.scale == 512.0


def test_growth_after_window_of_clean_steps_restores_hysteresis():
    s = dynamic(initial=8.0, window=3)
    s.update(True)  # hysteresis tracker 2 -> 1
    for _ in range(2):
        s.update(False)
    assert s.scale == 8.0
    s.update(False)
    assert s.scale == 16.0  # 3 clean steps in a row: doubled
    s.update(True)
    assert s.scale == 16.0  # hysteresis restored to 2: one overflow does not halve
    for _ in range(3):
        s.update(False)
    assert s.scale == 32.0


def test_overflow_resets_the_growth_window():
    s = dynamic(initial=8.0, window=3, hysteresis=5)
    for found in (False, False, True, False, False):
        s.update(found)
    assert s.scale == 8.0
    s.update(False)
    assert s.scale == 16.0


def test_never_below_min_scale():
    s = dynamic(initial=4.0, min_scale=2.0, hysteresis=1)
    for _ in range(4):
        s.update(True)
        assert s.scale == 2.0


def test_state_dict_round_trips_through_json():
    s = dynamic(initial=1024.0, window=1000)
    for found in (True, False, False):
        s.update(found)
    state = json.loads(json.dumps(s.state_dict()))
    assert state == {"scale": 1024.0, "growth_tracker": 2, "hysteresis_tracker": 1}
    t = dynamic(initial=2.0**32, window=1000)
    t.load_state_dict(state)
    assert (t.scale, t.state_dict()) == (1024.0, state)
    t.update(True)  # hysteresis tracker restored as 1: this overflow halves
    assert t.scale == 512.0
    # A Megatron checkpoint stores the scale as a 1-element tensor.
    t.load_state_dict({"scale": torch.tensor([64.0]), "growth_tracker": 0, "hysteresis_tracker": 2})
    assert t.scale == 64.0 and isinstance(t.scale, float)


def test_megatron_defaults_and_float_window():
    # --loss-scale-window parses as a float (1000.0); --initial-loss-scale defaults to 2**32.
    s = DynamicGradScaler(2.0**32, 1.0, growth_interval=1000.0, hysteresis=2)
    assert s.growth_interval == 1000 and s.scale == 2.0**32


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"initial": 0.0}, "--initial-loss-scale"),
        ({"initial": 4.0, "min_scale": 8.0}, "--min-loss-scale"),
        ({"min_scale": 0.0}, "--min-loss-scale"),
        ({"window": 0}, "--loss-scale-window"),
        ({"window": 2.5}, "--loss-scale-window"),
        ({"hysteresis": 0}, "--hysteresis"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs, flag):
    with pytest.raises(UsageError, match=flag):
        dynamic(**kwargs)


def test_constant_scaler():
    s = ConstantGradScaler(128.0)
    s.update(True)
    s.update(False)
    assert (s.scale, s.inv_scale, s.state_dict()) == (128.0, 1.0 / 128.0, {})
    s.load_state_dict({})
    with pytest.raises(UsageError, match="--loss-scale"):
        ConstantGradScaler(0.0)


@pytest.fixture(params=["fused", "fallback"])
def path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(grad_scaler, "_fused_op", None)
    return request.param


def test_unscale_finite_grads(path):
    torch.manual_seed(0)
    ref = [torch.randn(5, 3), torch.randn(4).half(), torch.randn(2, 2).bfloat16()]
    grads = [g * 8.0 for g in ref] + [None]
    found = non_finite_check_and_unscale_(grads, 1.0 / 8.0)
    assert found.dtype == torch.float32 and found.item() == 0.0
    for g, r in zip(grads, ref):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r)
    assert unscale_and_check_(grads, torch.tensor(2.0)) is False
    torch.testing.assert_close(grads[0], ref[0] * 2.0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_unscale_detects_non_finite(path, bad):
    grads = [torch.ones(3), torch.ones(4, dtype=torch.float16), torch.ones(2)]
    grads[1][2] = bad
    assert unscale_and_check_(grads, 0.5) is True
    torch.testing.assert_close(grads[0], torch.full((3,), 0.5))  # finite grads still unscaled
    torch.testing.assert_close(grads[2], torch.full((2,), 0.5))


def test_unscale_of_nothing_is_finite():
    assert unscale_and_check_([], 0.5) is False
    assert unscale_and_check_([None], 0.5) is False


def _sharded_overflow(bad_rank: int) -> tuple[float, float, list[float]]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(1.0, 5.0) * 4.0  # [4]: two elements per rank
    grad = distribute_tensor(full, mesh, [Shard(0)])
    if dist.get_rank() == bad_rank:
        grad.to_local()[0] = float("inf")
    found = non_finite_check_and_unscale_([grad], 0.25)
    local = found.item()
    dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return local, found.item(), grad.to_local().tolist()


def test_dtensor_grads_checked_per_shard_then_all_reduced():
    results = get_world(2).run(_sharded_overflow, 1)
    assert [r[0] for r in results] == [0.0, 1.0]  # only rank 1's shard overflowed
    assert [r[1] for r in results] == [1.0, 1.0]  # after the caller's all-reduce, both skip
    assert results[0][2] == [1.0, 2.0]  # unscaled in place through the DTensor
    assert results[1][2][1] == 4.0
