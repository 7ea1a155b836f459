"""Learning-rate / weight-decay schedules and micro-batch counts match Megatron's closed forms."""

import json
import math
import shlex

import pytest
import torch

from megatron.errors import UsageError
from megatron.initialize.arguments import parse_args
from megatron.optimizer.optimizer_param_scheduler import (
    OptimizerParamScheduler,
    get_optimizer_param_scheduler,
)
from megatron.training.microbatches import (
    ConstantNumMicroBatches,
    RampupBatchsizeNumMicroBatches,
    build_num_microbatches_calculator,
)

MAX_LR, MIN_LR = 1e-3, 1e-5


def make_optimizer() -> torch.optim.Optimizer:
    """Weights (lr_mult 0.5), and biases/norms (wd_mult 0) like the real param groups."""
    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD(
        [
            {"params": [w], "wd_mult": 1.0, "lr_mult": 0.5},
            {"params": [b], "wd_mult": 0.0},
        ],
        lr=0.123,
    )


def sched(style="linear", warmup=100, decay=1000, start_wd=0.1, end_wd=0.1, wd_style="constant",
          wd_steps=1000, min_lr=MIN_LR, **kw) -> OptimizerParamScheduler:  # fmt: skip
    return OptimizerParamScheduler(
        make_optimizer(),
        init_lr=0.0,
        max_lr=MAX_LR,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=style,
        start_wd=start_wd,
        end_wd=end_wd,
        wd_incr_steps=wd_steps,
        wd_incr_style=wd_style,
        **kw,
    )


def lr_at(s: OptimizerParamScheduler, samples: int) -> float:
    s.step(samples - s.num_steps)
    return s.get_lr()


def test_linear_warmup_then_styles():
    for style in ("linear", "cosine", "constant", "inverse-square-root"):
        s = sched(style)
        assert s.get_lr() == 0.0  # step(0) at construction: the warm-up starts from init_lr
        assert lr_at(s, 25) == pytest.approx(MAX_LR * 0.25)
        assert lr_at(s, 100) == pytest.approx(MAX_LR)


@pytest.mark.parametrize(
    "samples, ratio",
    [(101, 1 / 900), (325, 0.25), (550, 0.5), (999, 899 / 900), (1000, 1.0)],
)
def test_linear_and_cosine_decay(samples, ratio):
    delta = MAX_LR - MIN_LR
    assert lr_at(sched("linear"), samples) == pytest.approx(MIN_LR + (1 - ratio) * delta)
    cos = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    assert lr_at(sched("cosine"), samples) == pytest.approx(MIN_LR + cos * delta)


@pytest.mark.parametrize("style", ["linear", "cosine", "inverse-square-root"])
def test_min_lr_beyond_decay(style):
    assert lr_at(sched(style), 1001) == MIN_LR
    assert lr_at(sched(style), 10**6) == MIN_LR


def test_constant_style_keeps_max_lr_forever():
    assert lr_at(sched("constant"), 500) == MAX_LR
    assert lr_at(sched("constant"), 10**6) == MAX_LR


def test_inverse_square_root():
    s = sched("inverse-square-root", min_lr=0.4 * MAX_LR)
    assert lr_at(s, 400) == pytest.approx(MAX_LR * math.sqrt(100) / math.sqrt(400))
    assert lr_at(s, 500) == pytest.approx(MAX_LR * math.sqrt(100 / 500))
    assert lr_at(s, 900) == 0.4 * MAX_LR  # max * 1/3 is below the floor
    # No warm-up: sqrt(max(warmup, 1)) / sqrt(max(step, 1)).
    assert lr_at(sched("inverse-square-root", warmup=0), 0) == MAX_LR
    assert lr_at(sched("inverse-square-root", warmup=0, min_lr=0.0), 16) == MAX_LR / 4


def test_step_writes_multipliers_into_param_groups():
    s = sched("linear", wd_style="linear", start_wd=0.0, end_wd=0.2, wd_steps=1000)
    for _ in range(11):  # 11 iterations of global batch 50 = 550 samples
        s.step(increment=50)
    lr = MIN_LR + 0.5 * (MAX_LR - MIN_LR)
    weights, biases = s.optimizer.param_groups
    assert weights["lr"] == pytest.approx(0.5 * lr) and biases["lr"] == pytest.approx(lr)
    assert weights["weight_decay"] == pytest.approx(0.2 * 0.55)
    assert biases["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "style, samples, expected",
    [
        ("constant", 0, 0.1),
        ("constant", 5000, 0.1),
        ("linear", 0, 0.0),
        ("linear", 250, 0.05),
        ("linear", 1000, 0.2),
        ("linear", 1001, 0.2),
        ("cosine", 0, 0.0),
        ("cosine", 500, 0.1),
        ("cosine", 250, 0.2 * 0.5 * (math.cos(math.pi * 0.75) + 1.0)),
        ("cosine", 5000, 0.2),
    ],
)
def test_weight_decay_increment(style, samples, expected):
    start, end = (0.1, 0.1) if style == "constant" else (0.0, 0.2)
    s = sched(start_wd=start, end_wd=end, wd_style=style, wd_steps=1000)
    s.step(samples)
    assert s.get_wd() == pytest.approx(expected)


def test_state_dict_round_trip_through_json():
    s = sched("cosine", wd_style="linear", start_wd=0.0, end_wd=0.2)
    s.step(640)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["num_steps"] == 640 and state["max_lr"] == MAX_LR
    t = sched("cosine", wd_style="linear", start_wd=0.0, end_wd=0.2)
    t.load_state_dict(state)
    assert t.num_steps == 640 and t.get_lr() == s.get_lr() and t.get_wd() == s.get_wd()
    assert t.optimizer.param_groups[1]["lr"] == s.get_lr()
    t.step(10)
    s.step(10)
    assert t.get_lr() == s.get_lr()


def test_use_checkpoint_and_override():
    old = sched("cosine", warmup=100, decay=1000)
    old.step(500)
    state = old.state_dict()
    # Neither flag: every field must agree, else one clear error naming the flag.
    with pytest.raises(
        UsageError, match=r"\(--lr\) gives 0.002; pass --use-checkpoint-opt_param-scheduler"
    ):
        new = sched("cosine", warmup=100, decay=2000, use_checkpoint_opt_param_scheduler=False)
        new.max_lr = 2e-3
        new.load_state_dict(state)
    with pytest.raises(UsageError, match="--lr-decay-iters/-samples/-tokens"):
        sched("cosine", decay=2000, use_checkpoint_opt_param_scheduler=False).load_state_dict(state)
    agree = sched("cosine", use_checkpoint_opt_param_scheduler=False)
    agree.load_state_dict(state)
    assert agree.get_lr() == old.get_lr()
    # --use-checkpoint-opt_param-scheduler: the checkpoint's schedule wins.
    kept = sched("linear", warmup=10, decay=2000)
    kept.load_state_dict(state)
    assert (kept.lr_decay_style, kept.lr_decay_steps, kept.num_steps) == ("cosine", 1000, 500)
    assert kept.get_lr() == old.get_lr()
    # --override-opt_param-scheduler: the command line's schedule, the checkpoint's position.
    over = sched(
        "linear",
        warmup=10,
        decay=2000,
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    over.load_state_dict(state)
    assert (over.lr_decay_style, over.lr_decay_steps, over.num_steps) == ("linear", 2000, 500)
    assert over.get_lr() == pytest.approx(MIN_LR + (1 - 490 / 1990) * (MAX_LR - MIN_LR))


def test_legacy_state_keys_load():
    legacy = {"start_lr": MAX_LR, "min_lr": MIN_LR, "warmup_iter": 100, "end_iter": 1000,
              "decay_style": "linear", "num_iters": 550}  # fmt: skip
    s = sched("linear")
    s.load_state_dict(legacy)
    assert s.num_steps == 550 and s.get_lr() == pytest.approx(MIN_LR + 0.5 * (MAX_LR - MIN_LR))
    with pytest.raises(UsageError, match="no num_steps"):
        sched("linear").load_state_dict({"max_lr": MAX_LR})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"warmup": 1000, "decay": 1000}, "warm-up"),
        ({"decay": 0}, "decay length"),
        ({"style": "exponential"}, "--lr-decay-style"),
        ({"min_lr": 2 * MAX_LR}, "--min-lr"),
        ({"start_wd": 0.1, "end_wd": 0.2}, "--weight-decay-incr-style constant"),
        ({"start_wd": 0.2, "end_wd": 0.1, "wd_style": "linear"}, "--end-weight-decay"),
        ({"override_opt_param_scheduler": True}, "choose one"),
    ],
)
def test_bad_schedules_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        sched(**kwargs)


def args_for(extra: str):
    base = "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --micro-batch-size 1 "
    args = parse_args(args_list=shlex.split(base + extra))
    return args


def scheduler_for(extra: str, gbs: int = 8) -> OptimizerParamScheduler:
    args = args_for(extra)
    args.global_batch_size = gbs
    return get_optimizer_param_scheduler(make_optimizer(), args)


def test_iteration_based_conversion():
    s = scheduler_for("--lr 1e-3 --train-iters 100 --lr-warmup-iters 10 --seq-length 64")
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == (80, 800, 800)
    assert (s.start_wd, s.end_wd) == (0.01, 0.01)  # --weight-decay default
    s = scheduler_for("--lr 1e-3 --train-iters 100 --lr-decay-iters 50 --lr-warmup-fraction 0.1")
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == (40, 400, 800)


def test_sample_based_conversion():
    s = scheduler_for("--lr 1e-3 --train-samples 1000 --lr-warmup-samples 30 --min-lr 1e-5")
    assert (s.lr_warmup_steps, s.lr_decay_steps) == (30, 1000)
    s = scheduler_for(
        "--lr 1e-3 --train-samples 1000 --lr-decay-samples 600 --lr-warmup-fraction 0.5 "
        "--weight-decay 0.1 --start-weight-decay 0.0 --weight-decay-incr-style linear"
    )
    assert (s.lr_warmup_steps, s.lr_decay_steps, s.wd_incr_steps) == (300, 600, 1000)
    assert (s.start_wd, s.end_wd, s.wd_incr_style) == (0.0, 0.1, "linear")


def test_token_based_conversion_anchor_numbers():
    # Megatron-DeepSpeed's 1.3B / 32k anchor: token flags with --train-samples.
    s = scheduler_for(
        "--lr 2.0e-4 --min-lr 1.0e-6 --lr-decay-style cosine --train-samples 9155273 "
        "--lr-decay-tokens 300000000000 --lr-warmup-tokens 3000000000 --seq-length 32768 "
        "--override-opt_param-scheduler --weight-decay 0.1"
    )
    warmup_t, decay_t, seq = 3_000_000_000, 300_000_000_000, 32768
    assert s.lr_warmup_steps == warmup_t / seq and s.lr_decay_steps == decay_t / seq

    def mds_lr(tokens):  # Megatron-DeepSpeed's get_lr() with token-based warm-up and decay
        if tokens <= warmup_t:
            return 2.0e-4 * tokens / warmup_t
        if tokens > decay_t:
            return 1.0e-6
        ratio = (tokens - warmup_t) / (decay_t - warmup_t)
        return 1.0e-6 + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (2.0e-4 - 1.0e-6)

    for samples in (45776, 91552, 91553, 4_000_000, 9_155_273, 9_155_274):
        assert lr_at(s, samples) == pytest.approx(mds_lr(samples * seq), rel=1e-12), samples
    # Tokens are counted as samples x seq-length: the same schedule in tokens.
    t = scheduler_for(
        "--lr 1e-3 --train-iters 10 --lr-decay-tokens 6400 --lr-warmup-tokens 640 --seq-length 64"
    )
    assert (t.lr_warmup_steps, t.lr_decay_steps) == (10, 100)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("--lr 1e-3", "--train-iters, --train-samples or --train-tokens"),
        ("--train-iters 10", "--lr is required"),
        ("--lr 1e-3 --train-iters 10 --lr-decay-samples 5", "--lr-decay-samples"),
        ("--lr 1e-3 --train-samples 10 --lr-warmup-iters 5", "--lr-warmup-iters"),
        ("--lr 1e-3 --train-samples 99 --lr-warmup-fraction 0.1 --lr-warmup-samples 3", "choose"),
        ("--lr 1e-3 --train-samples 99 --lr-decay-tokens 640", "--seq-length"),
        (
            "--lr 1e-3 --train-samples 99 --seq-length 8 --lr-decay-tokens 640 --lr-decay-samples 9",
            "--lr-decay-tokens and",
        ),
        (
            "--lr 1e-3 --train-samples 99 --seq-length 8 --lr-warmup-tokens 64 "
            "--lr-warmup-fraction 0.1",
            "--lr-warmup-tokens and",
        ),
    ],
)
def test_bad_schedule_flags_are_usage_errors(extra, match):
    with pytest.raises(UsageError, match=match):
        scheduler_for(extra)


def test_constant_micro_batches():
    calc = build_num_microbatches_calculator(0, None, 16, 2, 2)
    assert isinstance(calc, ConstantNumMicroBatches)
    calc.update(12345, True)
    assert (calc.get(), calc.get_current_global_batch_size()) == (4, 16)
    with pytest.raises(UsageError, match="--global-batch-size 12 is not divisible"):
        build_num_microbatches_calculator(0, None, 12, 2, 4)


@pytest.mark.parametrize(
    "consumed, gbs",
    [(0, 4), (39, 4), (40, 8), (79, 8), (80, 12), (119, 12), (120, 16), (121, 16), (10**6, 16)],
)
def test_rampup_micro_batches(consumed, gbs):
    # Start 4, +4 per step over 120 samples to 16: 3 increments, one every 40 samples.
    calc = build_num_microbatches_calculator(0, ["4", "4", "120"], 16, 2, 2)  # argparse strings
    assert isinstance(calc, RampupBatchsizeNumMicroBatches)
    calc.update(consumed, True)
    assert calc.get_current_global_batch_size() == gbs
    assert calc.get() == gbs // 4


def test_rampup_training_loop_consumes_growing_batches():
    calc = build_num_microbatches_calculator(0, [4, 4, 120], 16, 2, 2)
    consumed, sizes = 0, []
    while consumed < 200:
        calc.update(consumed, True)
        sizes.append(calc.get_current_global_batch_size())
        consumed += sizes[-1]
    assert sizes == [4] * 10 + [8] * 5 + [12] * 4 + [16] * 5


def test_rampup_nothing_to_ramp():
    assert build_num_microbatches_calculator(0, [16, 4, 100], 16, 2, 2).get() == 4
    calc = build_num_microbatches_calculator(0, [4, 4, 0], 16, 2, 2)
    assert calc.get_current_global_batch_size() == 16


@pytest.mark.parametrize(
    "rampup, match",
    [
        ([4, 5, 100], "increment 5 does not divide"),
        ([32, 4, 100], "larger than --global-batch-size"),
        ([2, 2, 100], "multiples of --micro-batch-size"),
        ([4, 6, 100], "multiples of --micro-batch-size"),  # 4 + 6 = 10 is not whole micro-batches
        ([0, 4, 100], "must be positive"),
        (["a", "b", "c"], "expected three integers"),
        ([4, 4], "expected three integers"),
    ],
)
def test_bad_rampup_is_usage_error(rampup, match):
    with pytest.raises(UsageError, match=match):
        build_num_microbatches_calculator(0, rampup, 16, 2, 2)
