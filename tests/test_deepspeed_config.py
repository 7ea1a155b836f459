"""--deepspeed_config: every documented field honoured, refused or listed in one warning."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from dist_helper import get_world

from megatron.errors import UsageError
from megatron.initialize import deepspeed_config as dsc
from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import parse_args
from megatron.initialize.deepspeed_keys import SECTIONS, TOP_LEVEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64 --train-iters 10"


def _args(tmp_path, cfg: dict, extra: str = "", world_size: int = 1):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    args = parse_args(args_list=shlex.split(f"{TINY} {extra} --deepspeed_config {path}"))
    args.world_size = world_size
    return validate_args(args)


def _error(tmp_path, cfg: dict, extra: str = "") -> str:
    with pytest.raises(UsageError) as err:
        _args(tmp_path, cfg, extra)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_every_documented_field_has_a_disposition():
    for name in TOP_LEVEL:
        kinds = [
            name in dsc.HONOURED["top"],
            name in dsc.REFUSED,
            name in dsc.NO_EFFECT,
        ]
        assert sum(kinds) == 1, (name, kinds)
    for section, fields in SECTIONS.items():
        if section in dsc.NO_EFFECT:  # the whole block is listed
            continue
        for field in fields:
            kinds = [
                field in dsc.HONOURED[section],
                field in dsc.SECTION_NO_EFFECT.get(section, {}),
            ]
            assert sum(kinds) == 1, (section, field, kinds)


def _example_config(tmp_path) -> tuple[str, list[str]]:
    """The JSON the 1.3B example writes for an fp16 run (and its command line)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHON=sys.executable, DRY_RUN="1", MOCK_DATA="1", OUTPUT_DIR=str(tmp_path),
               GPUS_PER_NODE="1", SP_SIZE="1", MICRO_BATCH="2", GLOBAL_BATCH="4",
               PRECISION="fp16", ZERO_STAGE="0", LOG_INTERVAL="1")  # fmt: skip
    script = os.path.join(ROOT, "examples_seq_parallel", "ds_pretrain_gpt_1.3B_seq_parallel_32k.sh")
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout.strip().splitlines()[-1])
    return cmd[cmd.index("--deepspeed_config") + 1], cmd


def test_example_fp16_block_sets_the_loss_scaler(tmp_path):
    path, cmd = _example_config(tmp_path)
    assert "--initial-loss-scale" not in cmd and "--fp16" in cmd  # the JSON alone sets it
    args = parse_args(
        args_list=shlex.split(f"{TINY} --fp16 --log-interval 1 --deepspeed_config {path}")
    )
    validate_args(args)
    assert (args.initial_loss_scale, args.loss_scale_window, args.hysteresis) == (2048, 500, 2)
    assert args.min_loss_scale == 1 and args.loss_scale is None and args.clip_grad == 1.0
    assert (args.micro_batch_size, args.global_batch_size, args.zero_stage) == (2, 4, 0)
    assert args.compat_warnings == []


def _train_fp16(config_path: str) -> list[str]:
    import logging

    from train_utils import run_training

    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Capture()
    logging.getLogger("megatron").addHandler(handler)
    try:
        run_training(f"--fp16 --train-iters 2 --lr-warmup-iters 0 --deepspeed_config {config_path}")
    finally:
        logging.getLogger("megatron").removeHandler(handler)
    return lines


def test_example_fp16_config_trains_with_loss_scale_2048(tmp_path):
    path, _ = _example_config(tmp_path)
    lines = get_world(1).run(_train_fp16, path)[0]
    first = next(line for line in lines if re.search(r" iteration\s+1/", line))
    assert "loss scale: 2048.0" in first, first


def test_flag_given_at_its_default_still_conflicts(tmp_path):
    cfg = {"gradient_clipping": 0.5, "train_micro_batch_size_per_gpu": 1}
    msg = _error(tmp_path, cfg, "--clip-grad 1.0")
    assert "sets gradient_clipping=0.5 but --clip-grad is 1.0" in msg
    assert _args(tmp_path, cfg).clip_grad == 0.5  # not given: filled


def test_loss_scale_fields(tmp_path):
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "hysteresis": 3,
            "consecutive_hysteresis": True, "min_loss_scale": 4, "loss_scale_window": 100}  # fmt: skip
    a = _args(tmp_path, {"fp16": fp16, "train_micro_batch_size_per_gpu": 1})
    assert a.fp16 and a.initial_loss_scale == 4096 and a.hysteresis == 3 and a.min_loss_scale == 4
    assert a.loss_scale_consecutive_hysteresis and a.loss_scale_window == 100
    msg = _error(tmp_path, {"fp16": fp16}, "--micro-batch-size 1 --initial-loss-scale 65536")
    assert "sets fp16.initial_scale_power=12 (2^12 = 4096) but --initial-loss-scale is 65536" in msg
    static = _args(tmp_path, {"fp16": {"enabled": True, "loss_scale": 128}}, "--micro-batch-size 1")
    assert static.loss_scale == 128
    msg = _error(tmp_path, {"fp16": {"enabled": False}}, "--micro-batch-size 1 --fp16")
    assert "sets fp16.enabled=false but --fp16 was given" in msg


def test_optimizer_and_scheduler_map_to_flags(tmp_path):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 2,
                      "warmup_type": "linear", "cos_min_ratio": 0.1}},
    }  # fmt: skip
    a = _args(tmp_path, cfg, "--lr 3e-4")
    assert (a.optimizer, a.adam_beta2, a.adam_eps, a.weight_decay) == ("adamw", 0.95, 1e-6, 0.1)
    assert (a.lr_warmup_iters, a.lr_decay_iters, a.lr_decay_style) == (2, 10, "cosine")
    assert a.min_lr == pytest.approx(3e-5)
    msg = _error(tmp_path, cfg, "--lr 1e-3")
    assert "sets optimizer.params.lr=0.0003 but --lr is 0.001" in msg
    msg = _error(tmp_path, cfg, "--lr 3e-4 --optimizer sgd")
    assert "sets optimizer.type=AdamW but --optimizer is sgd" in msg
    cfg["scheduler"]["params"]["warmup_type"] = "log"
    assert "only linear warm-up is built" in _error(tmp_path, cfg, "--lr 3e-4")
    lamb = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Lamb"}}
    assert 'optimizer.type="Lamb": only Adam, AdamW and SGD are built' in _error(tmp_path, lamb)


REFUSALS = [
    ({"fp16_enabled": True}, "'fp16_enabled' is not a DeepSpeed config field"),
    ({"fp16": {"enabled": True, "loss_scal": 0}}, "fp16.loss_scal is not a DeepSpeed field of fp16"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "zero_optimization.offload_param"),
    ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, "zero_optimization.cpu_offload"),
    ({"amp": {"enabled": True}}, "amp: Apex AMP is not used; use --fp16 or --bf16"),
    ({"gradient_allreduce_op": "sum"}, "gradients are averaged over the data-parallel ranks"),
]  # fmt: skip


@pytest.mark.parametrize("cfg,message", REFUSALS)
def test_refused_fields(tmp_path, cfg, message):
    assert message in _error(tmp_path, {"train_micro_batch_size_per_gpu": 1, **cfg})


def test_no_effect_fields_share_one_warning(tmp_path):
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "prescale_gradients": True,
        "wall_clock_breakdown": True,
        "steps_per_print": 5,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 1000, "overlap_comm": True},
        "bf16": {"enabled": True, "immediate_grad_update": True, "check_grad_overflow": False},
        "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True},
        "flops_profiler": {"enabled": False, "profile_step": 3},  # off: asks for nothing
    }
    a = _args(tmp_path, cfg, "--checkpoint-activations")
    lines = [line for line in a.compat_warnings if "--deepspeed_config" in line]
    assert len(lines) == 1
    for field in ("prescale_gradients=true", "wall_clock_breakdown=true", "steps_per_print=5",
                  "zero_optimization.reduce_bucket_size=1000", "zero_optimization.overlap_comm",
                  "bf16.immediate_grad_update", "bf16.check_grad_overflow=false",
                  "activation_checkpointing.partition_activations"):  # fmt: skip
        assert field in lines[0], field
    assert "flops_profiler" not in lines[0] and ": 8 field(s) change nothing here: " in lines[0]
    assert a.checkpoint_in_cpu and a.bf16 and a.zero_stage == 1


def test_consecutive_hysteresis_restores_on_every_clean_step():
    from megatron.optimizer.grad_scaler import DynamicGradScaler

    plain = DynamicGradScaler(1024.0, 1.0, growth_interval=100, hysteresis=2)
    consecutive = DynamicGradScaler(
        1024.0, 1.0, growth_interval=100, hysteresis=2, consecutive_hysteresis=True
    )
    for scaler in (plain, consecutive):
        for found_inf in (True, False, True):
            scaler.update(found_inf)
    assert plain.scale == 512.0  # two overflows, not in a row, spend the hysteresis
    assert consecutive.scale == 1024.0  # the clean step in between restored it


def test_megatron_deepspeed_template_with_prescaled_gradients(tmp_path):
    # Megatron-DeepSpeed's ds_config_gpt_TEMPLATE.json as its 1.3B script fills it for ZeRO 0.
    template = {
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 10,
        "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "prescale_gradients": True,
        "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2,
                 "min_loss_scale": 1, "initial_scale_power": 11},
        "wall_clock_breakdown": False,
    }  # fmt: skip
    a = _args(tmp_path, template, "--fp16 --hysteresis 2 --log-interval 10", world_size=8)
    assert a.fp16 and a.initial_loss_scale == 2048 and a.global_batch_size == 8
    (line,) = a.compat_warnings
    assert (
        ": 1 field(s) change nothing here: prescale_gradients=true (gradients are reduced" in line
    )


def test_offload_fields_map_to_the_cpu_offload_flags(tmp_path):
    """zero_optimization.offload_optimizer / offload_param with device cpu turn on the
    host offload flags; a DeepSpeed engine knob is named in a start-up line."""
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu", "buffer_count": 4},
            "offload_param": {"device": "cpu", "pin_memory": False},
        },
    }
    args = _args(tmp_path, cfg)
    assert args.cpu_optimizer and args.cpu_offload_params and not args.offload_pin_memory
    assert any("buffer_count" in line for line in args.compat_warnings)
