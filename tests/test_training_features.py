"""Logging, TensorBoard, non-finite gradients, launchers, signals and restarts."""

import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from dist_helper import get_world
from fault_injection import faults
from train_utils import TINY_TRAIN, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(
    r" iteration\s+(\d+)/\s*(\d+) \| consumed samples:\s+(\d+) \| consumed tokens:\s+(\d+) \| "
    r"elapsed time per iteration \(ms\): ([\d.]+) \| learning rate: ([\d.E+-]+) \| global batch size:\s+(\d+) \| "
    r"lm loss: ([\d.E+-]+) \| loss scale: ([\d.]+) \| grad norm: ([\d.]+|nan) \| actual seqlen:\s+(\d+) \| "
    r"number of skipped iterations:\s+(\d+) \| number of nan iterations:\s+(\d+) \| samples per second: ([\d.]+) \| "
    r"tokens per gpu per second \(tgs\): ([\d.]+) \| TFLOPs: ([\d.]+) \|"
)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run_captured(extra, fault=""):
    """Train with the faults of ``fault`` (``tests/fault_injection.py``); capture the log."""
    cap = _Capture()
    logging.getLogger("megatron").addHandler(cap)
    try:
        try:
            losses = run_training(extra, callbacks=faults(fault))
            code = 0
        except SystemExit as e:
            losses, code = None, e.code
    finally:
        logging.getLogger("megatron").removeHandler(cap)
    return losses, code, cap.lines


def _features(tmp):
    out = {}
    out["tb"] = _run_captured(
        f"--train-iters 6 --eval-interval 3 --eval-iters 1 --tensorboard-dir {tmp}/tb --log-timers-to-tensorboard "
        "--log-validation-ppl-to-tensorboard --log-batch-size-to-tensorboard"
    )
    out["nan"] = _run_captured(f"--train-iters 4 --save {tmp}/nan --save-interval 1", "nan_grad@3")
    out["nan_stop"] = _run_captured("--train-iters 6 --max-nan-iterations 2", "nan_grad@2-3")
    out["tokens"] = _run_captured("--train-iters 100 --train-tokens 1000")
    out["skip"] = _run_captured("--train-iters 6 --eval-iters 1 --skip-train")
    for defer in (True, False):
        out[f"defer={defer}"] = _run_recording_lr(
            f"--train-iters 7 --log-interval 3 --save {tmp}/defer{defer} --save-interval 100",
            "nan_grad@4-5",
            defer,
        )
        out[f"defer={defer} stop"] = _run_recording_lr(
            "--train-iters 6 --log-interval 5 --max-nan-iterations 2",
            "nan_grad@2-3",
            defer,
        )
    return out


def _run_recording_lr(extra, fault, defer):
    """``_run_captured`` with the step's host bookkeeping deferred (the default) or done at
    once (``defer=False``); also returns the LR of every optimizer step as it was launched."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from megatron.training import training

    lrs = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"])
    )
    training.DEFER_STEP_SYNC = defer
    try:
        return (*_run_captured(extra, fault), lrs)
    finally:
        training.DEFER_STEP_SYNC = True
        handle.remove()


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    return get_world(1).run(_features, str(tmp))[0], tmp


def test_iteration_line_parses(features):
    losses, code, lines = features[0]["tb"]
    assert code == 0
    parsed = [LINE.search(line) for line in lines if "iteration" in line and "consumed" in line]
    assert len(parsed) == 6 and all(parsed)
    first = parsed[0]
    assert (
        first.group(1) == "1"
        and first.group(2) == "6"
        and first.group(3) == "4"
        and first.group(4) == "256"
    )
    assert float(first.group(8)) == pytest.approx(losses[0], rel=1e-6)
    assert any("validation loss at iteration 3" in line and "lm loss PPL" in line for line in lines)
    assert any("test loss at the end of training for test data" in line for line in lines)


def test_tensorboard_scalars(features):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(features[1] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm", "lm loss vs samples",
                "lm loss vs tokens", "interval-time", "lm loss validation", "lm loss validation ppl"):  # fmt: skip
        assert tag in tags, (tag, sorted(tags))
    assert len(acc.Scalars("lm loss")) == 6


def test_nan_gradient_is_skipped_without_touching_weights(features):
    losses, code, lines = features[0]["nan"]
    assert code == 0 and all(x == x for x in losses)
    line3 = next(line for line in lines if LINE.search(line) and LINE.search(line).group(1) == "3")
    assert "number of nan iterations:   1" in line3 and "grad norm: nan" in line3
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tensors = []
    for it in (2, 3):
        out = features[1] / f"it{it}.pt"
        dcp_to_torch_save(str(features[1] / "nan" / f"iter_000000{it}"), str(out))
        tensors.append(torch.load(out, weights_only=True)["model"])
    for name, value in tensors[0].items():
        assert torch.equal(value, tensors[1][name]), name  # the NaN step changed nothing


def test_repeated_nan_stops_with_a_clear_message(features):
    losses, code, lines = features[0]["nan_stop"]
    assert code == 2 and losses is None


def test_train_tokens_stops_training(features):
    losses, code, _ = features[0]["tokens"]
    assert code == 0 and len(losses) == 4  # 4 iterations x 4 samples x 64 tokens >= 1000


def test_skip_train_only_evaluates(features):
    losses, code, lines = features[0]["skip"]
    assert code == 0 and losses == []
    assert not any(LINE.search(line) for line in lines)
    assert any("test loss at the end of training for test data" in line for line in lines)


def test_deferred_step_sync_matches_immediate(features):
    """Finishing a step's bookkeeping during the next step changes nothing: the same losses,
    LR of every update, log lines (but their timings), counters and saved scheduler state."""
    import json

    out, tmp = features

    def untimed(lines):  # the iteration lines without the timing-dependent fields
        fields = (1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13)
        return [m.group(*fields) for m in map(LINE.search, lines) if m]

    deferred, immediate = out["defer=True"], out["defer=False"]
    assert deferred[1] == immediate[1] == 0
    assert len(deferred[0]) == 7 and deferred[0] == immediate[0]
    assert all(map(math.isfinite, deferred[0])) and len(deferred[3]) == 7
    assert deferred[3] == immediate[3]  # fused AdamW steps every iteration (skips on device)
    logged = untimed(deferred[2])
    assert [int(g[0]) for g in logged] == [3, 6] and logged == untimed(immediate[2])
    assert logged[1][-2:] == ("2", "2")  # iterations 4 and 5 skipped, counted as NaN
    metas = [
        json.loads((tmp / f"defer{d}" / "iter_0000007" / "meta.json").read_text())
        for d in (True, False)
    ]
    for key in ("train_state", "scheduler"):
        assert metas[0][key] == metas[1][key], key
    assert metas[0]["train_state"]["nan_iters"] == 2
    for defer in (True, False):  # the 2nd NaN in a row (iteration 3) stops before step 4
        losses, code, _, lrs = out[f"defer={defer} stop"]
        assert code == 2 and losses is None and len(lrs) == 3, (defer, lrs)  # no 4th update


def test_pending_step_reads_once():
    import torch

    from megatron.training.step_result import PendingStep

    values = torch.tensor([2.5, 1.0, 0.0])  # [lm loss, grad norm, found_inf]
    step = PendingStep(3, ["lm loss"], values)
    assert step.read() == ({"lm loss": 2.5}, 1.0, False)
    values.fill_(7.0)
    assert step.read() == ({"lm loss": 2.5}, 1.0, False)  # cached
    skipped = PendingStep(4, ["lm loss"], torch.tensor([2.0, float("nan"), 1.0]))
    assert skipped.read() == ({"lm loss": 2.0}, None, True)
    fp16 = PendingStep(5, ["lm loss"], torch.tensor([2.0]), known=(0.5, False))
    assert fp16.read() == ({"lm loss": 2.0}, 0.5, False)
    assert PendingStep(6, [], None, known=(None, True)).read() == ({}, None, True)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipping active, and not
def test_clipping_in_the_fused_step_matches_clipping_first(max_norm):
    """The fused AdamW divides the gradients by ``clip_divisor`` (its grad_scale): the same
    update and clipped gradients as ``clip_grads_with_norm_`` before a plain fused step."""
    import torch

    from megatron.core.distributed.fsdp import clip_divisor
    from megatron.optimizer.adamw import AdamW

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2)]
    base = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 3 for s in shapes]
    results = []
    for fold in (False, True):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if fold:
                opt.step(grad_scale=clip_divisor(norm, max_norm))
            else:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
                opt.step()
        results.append(([p.detach() for p in params], [p.grad for p in params]))
    for a, b in zip(*(r[0] + r[1] for r in results)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_step_matches_torch_and_skips_on_found_inf(fused):
    """``megatron.optimizer.AdamW`` updates exactly as ``torch.optim.AdamW``; given
    ``found_inf`` 1 its fused step changes no parameter."""
    import torch

    from megatron.optimizer import AdamW

    torch.manual_seed(0)
    base = [torch.randn(5, 3), torch.randn(3)]
    params = [[torch.nn.Parameter(b.clone()) for b in base] for _ in range(2)]
    opts = [
        cls([{"params": p[:1]}, {"params": p[1:], "weight_decay": 0.0}], lr=1e-2, fused=fused)
        for cls, p in zip((torch.optim.AdamW, AdamW), params)
    ]
    for _ in range(3):
        grads = [torch.randn_like(b) for b in base]
        for opt, ps in zip(opts, params):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(*params):
        assert torch.equal(a, b)
    if fused:
        before = [p.detach().clone() for p in params[1]]
        opts[1].step(found_inf=torch.tensor(1.0))
        assert all(torch.equal(a, b) for a, b in zip(before, params[1]))
    else:
        with pytest.raises(ValueError, match="fused"):
            opts[1].step(found_inf=torch.tensor(1.0))


def _megatron_call_with_callbacks():
    """Megatron's positional call (a model type, no effect); a callback sees every iteration."""
    import shlex

    import pretrain_gpt
    from megatron.training.callbacks import TrainingCallback
    from megatron.training.training import pretrain

    class Recorder(TrainingCallback):
        def __init__(self):
            self.calls = []

        def after_backward(self, iteration, model):
            grads = [p.grad for p in model.parameters()]
            self.calls.append(("after_backward", iteration, all(g is not None for g in grads)))

        def on_step_end(self, iteration, model):
            self.calls.append(("on_step_end", iteration))

    recorder = Recorder()
    pretrain_gpt._TOKENIZER = None
    losses = pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        pretrain_gpt.model_provider,
        "encoder_or_decoder",
        pretrain_gpt.forward_step,
        None,
        None,
        shlex.split(TINY_TRAIN + " --train-iters 3"),
        callbacks=[recorder],
    )
    return losses, recorder.calls, run_training("--train-iters 3")


def test_megatron_positional_call_and_callbacks():
    losses, calls, reference = get_world(1).run(_megatron_call_with_callbacks)[0]
    assert losses == reference
    expected = [(("after_backward", i, True), ("on_step_end", i)) for i in (1, 2, 3)]
    assert calls == [call for pair in expected for call in pair]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("MEGATRON_FAULT", None)
    return env


def _losses_from(stdout):
    return [float(m.group(8)) for m in map(LINE.search, stdout.splitlines()) if m]


def test_two_node_launch_matches_world1():
    ref = get_world(1).run(run_training, "--train-iters 6")[0]
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port)]  # fmt: skip
    args = [
        "pretrain_gpt.py",
        *TINY_TRAIN.split(),
        "--train-iters",
        "6",
        "--ds-sequence-parallel-size",
        "2",
    ]
    nodes = [
        subprocess.Popen([*cmd, "--node-rank", str(r), *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    outs = [n.communicate(timeout=180)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    assert "world 2 = PP 1 x DP 1 x SP 2" in outs[0]
    losses = _losses_from(outs[0])
    assert len(losses) == 6
    for a, b in zip(losses, ref):
        assert a == pytest.approx(b, rel=2e-6)


def test_sigterm_saves_and_exits_zero(tmp_path):
    cmd = [sys.executable, "pretrain_gpt.py", *TINY_TRAIN.split(), "--train-iters", "100000", "--exit-signal-handler",
           "--save", str(tmp_path / "ck"), "--save-interval", "100000"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        seen.append(line)
        if " iteration        3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(seen)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, "".join(seen) + rest
    iteration = int((tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text())
    assert iteration >= 3
    assert (tmp_path / "ck" / f"iter_{iteration:07d}" / "meta.json").is_file()


def test_rank_failure_restarts_from_checkpoint(tmp_path):
    ref = get_world(2).run(run_training, "--train-iters 8 --ds-sequence-parallel-size 2")[0]
    ck = str(tmp_path / "ck")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "3",
           "tests/fault_injection.py", *TINY_TRAIN.split(), "--train-iters", "8", "--ds-sequence-parallel-size", "2",
           "--save", ck, "--load", ck, "--save-interval", "2",
           # A restarted gloo group that cannot connect fails in a minute and torchrun tries again.
           "--distributed-timeout-minutes", "1"]  # fmt: skip
    env = dict(_env(), MEGATRON_FAULT="kill@1:5")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out = proc.communicate(timeout=420)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        pytest.fail("torchrun with --max-restarts did not finish in 420 s:\n" + out[-4000:])
    assert proc.returncode == 0, out[-3000:]
    done = subprocess.CompletedProcess(cmd, proc.returncode, out)
    assert "successfully loaded checkpoint" in done.stdout
    losses = _losses_from(done.stdout)
    assert losses[-1] == pytest.approx(ref[-1], rel=2e-6)
