"""Host offload of the optimizer (--cpu-optimizer, --optimizer-cpu-offload, DeepSpeed's
offload_optimizer) and of the parameters (--cpu-offload-params, offload_param): the same
losses as without, the same checkpoints, the state where it should be."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from dist_helper import get_world
from train_utils import run_training

from megatron.errors import UsageError
from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import parse_args
from megatron.initialize.long_context_args import (
    apply_offload_fields,
    check_long_context_args,
    distributed_backend,
)

MODEL = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64 --micro-batch-size 2"
)
RUNS = [
    "--zero-stage 1",
    "--cpu-optimizer",  # ZeRO 0 -> 1
    "--optimizer-cpu-offload --zero-stage 3",
    "--cpu-offload-params --zero-stage 3",
]


def _train_and_resume(tmp: str) -> dict:
    out = {"runs": [run_training(extra) for extra in RUNS]}
    # An offloaded run saved at 5 and resumed, and a GPU-optimizer checkpoint resumed offloaded.
    run_training(f"--cpu-optimizer --save {tmp}/a --save-interval 5 --exit-interval 5")
    out["resumed"] = run_training(f"--cpu-optimizer --load {tmp}/a")
    run_training(f"--zero-stage 1 --save {tmp}/b --save-interval 5 --exit-interval 5")
    out["crossed"] = run_training(f"--cpu-optimizer --load {tmp}/b")
    return out


def _placement() -> dict:
    """Where the parameters and the optimizer state live after one step."""
    from megatron.core import parallel_state
    from megatron.model import GPTModel
    from megatron.model.parallelize import apply_zero
    from megatron.optimizer.host_offload import HostOffloadAdamW
    from megatron.optimizer.optimizer import get_megatron_optimizer
    from tests.model_utils import tiny_config

    state = parallel_state.initialize_model_parallel(device_type="cpu")
    out = {}
    for flags, stage, params_off in (
        ("--cpu-optimizer", 1, False),
        ("--cpu-offload-params", 3, True),
    ):
        argv = [*MODEL.split(), *flags.split(), "--zero-stage", str(stage), "--lr", "1e-3"]
        args = parse_args(args_list=argv)
        model = apply_zero(GPTModel(tiny_config()), state, stage, offload_params=params_off)
        opt = get_megatron_optimizer(model, args)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        p = next(iter(model.parameters()))
        st = opt.state[p]
        fsdp_param = model._get_fsdp_state()._fsdp_param_group.fsdp_params[0]
        out[flags] = {
            "optimizer": type(opt).__name__,
            "host_offload": isinstance(opt, HostOffloadAdamW),
            "state_device": st["exp_avg"].to_local().device.type,
            "param_device": p.to_local().device.type,
            "offloaded_by_fsdp": fsdp_param.offload_to_cpu,
        }
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("offload"))
    world = get_world(1)
    return {"train": world.run(_train_and_resume, tmp)[0], "where": world.run(_placement)[0]}


def _same(run, ref, rel=1e-5):
    assert len(run) == len(ref) == 10
    for a, b in zip(run, ref):
        assert math.isclose(a, b, rel_tol=rel), (run, ref)


@pytest.mark.parametrize("i", range(1, len(RUNS)), ids=RUNS[1:])
def test_offloaded_runs_match(results, i):
    _same(results["train"]["runs"][i], results["train"]["runs"][0])


def _same_tail(run, ref, rel=1e-5):
    assert len(run) == 5, run
    for a, b in zip(run, ref[5:]):
        assert math.isclose(a, b, rel_tol=rel), (run, ref)


def test_checkpoints_resume_the_same(results):
    """An offloaded run resumed from its checkpoint, and a GPU-optimizer checkpoint resumed
    with the optimizer offloaded, continue as the run without a break."""
    _same_tail(results["train"]["resumed"], results["train"]["runs"][1])
    _same_tail(results["train"]["crossed"], results["train"]["runs"][0])


def test_where_things_live(results):
    opt_off = results["where"]["--cpu-optimizer"]
    assert opt_off["host_offload"] and opt_off["state_device"] == "cpu"
    assert not opt_off["offloaded_by_fsdp"]  # FSDP2 keeps the parameters where they are
    params_off = results["where"]["--cpu-offload-params"]
    assert params_off["optimizer"] == "AdamW" and params_off["offloaded_by_fsdp"]
    assert params_off["param_device"] == params_off["state_device"] == "cpu"


def _args(flags: str, config: dict | None = None, tmp=None) -> argparse.Namespace:
    argv = [*MODEL.split(), *flags.split()]
    if config is not None:
        path = tmp / "ds.json"
        path.write_text(json.dumps(config))
        argv += ["--deepspeed_config", str(path)]
    args = parse_args(args_list=argv)
    args.world_size, args.rank = 1, 0
    return validate_args(args)


def test_flags_and_their_notes():
    args = _args("--cpu-optimizer")
    assert args.zero_stage == 1
    assert any("--cpu-optimizer: optimizer state" in line for line in args.compat_warnings)
    assert any("set to 1" in line for line in args.compat_warnings)
    assert distributed_backend(args, "cuda") == "cpu:gloo,cuda:nccl"
    assert distributed_backend(args, "cpu") == "gloo"
    assert distributed_backend(_args(""), "cuda") == "nccl"
    with pytest.raises(UsageError, match="--cpu-offload-params .* needs --zero-stage 3"):
        _args("--cpu-offload-params --zero-stage 1")
    with pytest.raises(UsageError, match="--optimizer sgd"):
        _args("--cpu-optimizer --optimizer sgd")
    with pytest.raises(UsageError, match="--tiled-mlp-chunk-size -1"):
        _args("--tiled-mlp-chunk-size -1")


def test_deepspeed_offload_fields(tmp_path):
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    args = _args("", {"zero_optimization": zero}, tmp_path)
    assert args.cpu_optimizer and not args.cpu_offload_params and not args.offload_pin_memory
    zero = {"stage": 3, "offload_param": {"device": "cpu", "buffer_count": 5}}
    args = _args("", {"zero_optimization": zero}, tmp_path)
    assert args.cpu_offload_params
    assert any("buffer_count tune DeepSpeed" in line for line in args.compat_warnings)
    ns = argparse.Namespace(cpu_optimizer=True, cpu_offload_params=False)
    with pytest.raises(UsageError, match="device none but --cpu-optimizer"):
        apply_offload_fields({"offload_optimizer": {"device": "none"}}, ns, "ds.json")
    with pytest.raises(UsageError, match="nvme is not supported"):
        apply_offload_fields({"offload_param": {"device": "nvme"}}, ns, "ds.json")
    with pytest.raises(UsageError, match="ratio 0.5"):
        apply_offload_fields({"offload_optimizer": {"device": "cpu", "ratio": 0.5}}, ns, "x")
    assert check_long_context_args(_args("")) == []
