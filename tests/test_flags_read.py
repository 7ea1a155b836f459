"""Every flag of the training parser does something or says it does not.

The scan reads every attribute access and ``getattr``/``hasattr`` with a literal name in
megatron/ (but the parser's own module), pretrain_gpt.py and tools/: a flag's dest must be
among them, or be listed in ``COMPAT_ONLY`` (one start-up warning each). A listed flag must
not be read outside megatron/initialize/, where it would have an effect after all.
"""

import ast
import os
import re
import shlex
from pathlib import Path

import pytest
from dist_helper import get_world

from megatron.errors import UsageError
from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import COMPAT_ONLY, build_parser, parse_args

ROOT = Path(__file__).resolve().parent.parent
PARSER_MODULE = "megatron/initialize/arguments.py"
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 8 --seq-length 64 --micro-batch-size 1"
)


def names_read(source: str) -> set[str]:
    """Attribute names loaded, and literal names given to getattr/hasattr."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            out.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            out.add(node.args[1].value)
    return out


def _reads_by_file() -> dict[str, set[str]]:
    files = [*ROOT.glob("megatron/**/*.py"), ROOT / "pretrain_gpt.py", *ROOT.glob("tools/*.py")]
    return {
        f.relative_to(ROOT).as_posix(): names_read(f.read_text(encoding="utf-8"))
        for f in files
        if f.relative_to(ROOT).as_posix() != PARSER_MODULE
    }


def _dests() -> list[str]:
    return [a.dest for a in build_parser()._actions if a.option_strings and a.dest != "help"]


def test_scanner_sees_loads_and_getattr_hasattr_but_not_stores():
    src = "args.a = 1\nx = args.b\nif getattr(args, 'c', None): pass\nhasattr(o, 'd')\n"
    assert names_read(src) == {"b", "c", "d"}


def test_every_flag_is_read_or_listed_as_having_no_effect():
    read = set().union(*_reads_by_file().values())
    unread = [d for d in _dests() if d not in read and d not in COMPAT_ONLY]
    assert not unread, (
        f"parsed but never read: {unread}; implement them, or list them in COMPAT_ONLY "
        "(megatron/initialize/arguments.py) with what they would have done"
    )


def test_flags_listed_as_no_effect_are_not_read_elsewhere():
    assert set(COMPAT_ONLY) <= set(_dests())
    for path, read in _reads_by_file().items():
        if path.startswith("megatron/initialize/"):
            continue
        assert not (read & set(COMPAT_ONLY)), (path, sorted(read & set(COMPAT_ONLY)))


def _validated(cmdline: str, world_size: int = 1):
    args = parse_args(args_list=shlex.split(cmdline))
    args.world_size = world_size
    return validate_args(args)


@pytest.mark.parametrize(
    "flag",
    [
        "--ds-sequence-parallel-fpdt",
        "--ds-sequence-parallel-fpdt-chunk-size 65536",
        "--ds-sequence-parallel-fpdt-offloading",
    ],
)
def test_fpdt_flags_are_refused_with_a_pointer(flag):
    with pytest.raises(UsageError) as err:
        _validated(f"{TINY} {flag}")
    msg = str(err.value)
    assert msg.startswith(f"{flag}: FPDT") and "--checkpoint-in-cpu" in msg
    assert "tools/estimate_memory.py" in msg and "\n" not in msg


def test_deepspeed_activation_checkpointing_alone_does_not_recompute():
    # As in Megatron-DeepSpeed, where it only picks DeepSpeed's checkpoint function.
    a = _validated(f"{TINY} --deepspeed-activation-checkpointing")
    assert a.recompute_granularity is None
    assert any("--deepspeed-activation-checkpointing" in w for w in a.compat_warnings)
    b = _validated(f"{TINY} --deepspeed-activation-checkpointing --checkpoint-activations")
    assert b.recompute_granularity == "full"


def test_timing_log_level_and_evaluation_flags():
    a = _validated(f"{TINY} --timing-log-level 2 --log-interval 5")
    assert any("--timing-log-level" in w for w in a.compat_warnings)
    assert a.tensorboard_log_interval == 5  # follows --log-interval unless given
    assert _validated(f"{TINY} --tensorboard-log-interval 2").tensorboard_log_interval == 2
    with pytest.raises(UsageError, match="--skip-train skips training .* --eval-iters is 0"):
        _validated(f"{TINY} --skip-train --eval-iters 0")


def test_train_tokens_alone_sizes_the_schedule():
    from megatron.optimizer.optimizer_param_scheduler import _schedule_lengths

    a = _validated(f"{TINY} --train-tokens 6400 --lr-warmup-tokens 96 --lr 1e-3")
    assert _schedule_lengths(a) == (1.5, 100.0, 100.0)  # samples of 64 tokens


def test_preprocess_dataset_impl(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pp", ROOT / "tools" / "preprocess_data.py")
    pp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pp)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    base = f"--input {corpus} --output-prefix {tmp_path}/o --tokenizer-type NullTokenizer --vocab-size 9"
    assert pp.get_args(shlex.split(base + " --dataset-impl mmap")).dataset_impl == "mmap"
    with pytest.raises(UsageError, match="--dataset-impl lazy: only the mmap format is written"):
        pp.get_args(shlex.split(base + " --dataset-impl lazy"))


def _skip_train_and_tb_interval(tmp: str) -> tuple[list[str], list[str], list[int]]:
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_utils import run_training

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Capture()
    logging.getLogger("megatron").addHandler(handler)
    try:
        run_training(
            f"--train-iters 4 --log-interval 4 --tensorboard-log-interval 2 --save {tmp}/ck "
            f"--save-interval 4 --tensorboard-dir {tmp}/tb"
        )
        trained = list(lines)
        lines.clear()
        run_training(f"--train-iters 4 --load {tmp}/ck --skip-train --eval-iters 1")
    finally:
        logging.getLogger("megatron").removeHandler(handler)
    acc = EventAccumulator(os.path.join(tmp, "tb"))
    acc.Reload()
    return trained, lines, [e.step for e in acc.Scalars("lm loss")]


@pytest.fixture(scope="module")
def skip_train_run(tmp_path_factory):
    return get_world(1).run(_skip_train_and_tb_interval, str(tmp_path_factory.mktemp("skip")))[0]


def test_tensorboard_log_interval(skip_train_run):
    trained, _, tb_steps = skip_train_run
    assert tb_steps == [2, 4]
    iteration_lines = [line for line in trained if re.search(r" iteration\s+\d+/", line)]
    assert len(iteration_lines) == 1  # --log-interval 4


def test_skip_train_evaluates_the_checkpoint(skip_train_run):
    _, lines, _ = skip_train_run
    assert not [line for line in lines if re.search(r" iteration\s+\d+/", line)]
    assert any("--skip-train: evaluating the model at iteration 4" in line for line in lines)
    assert any("validation loss at the end of training" in line for line in lines)
    assert any("test loss at the end of training" in line for line in lines)
