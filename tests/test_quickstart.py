"""examples_seq_parallel/: the quickstart end to end, and the launch scripts' flag sets.

The quickstart runs shortened (a small slice of the corpus, 20 iterations, 2 CPU processes)
and then again to check that a re-run reuses everything. The launch scripts run their
CPU_SMOKE mode (tiny model, 3 iterations), and their full-size GPU command lines are parsed
and validated without running them. Run only these with ``-m quickstart``.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from dist_helper import get_world

from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import build_parser

pytestmark = pytest.mark.quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples_seq_parallel")
QUICKSTART = os.path.join(EXAMPLES, "quickstart.sh")
SCRIPTS = [
    "ds_pretrain_gpt_1.3B_seq_parallel_32k.sh",
    "ds_pretrain_gpt_30B_seq_parallel_32k.sh",
    "pretrain_llama_128k_seq_parallel.sh",
]
STEPS = ["set-up", "corpus", "tokenizer", "preprocess", "train", "generate"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def _bash(script: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.eE+-]+) \|", text)]


def test_quickstart_end_to_end(tmp_path):
    work = tmp_path / "work"
    env = _env(
        QUICKSTART_WORK=str(work), QUICKSTART_ITERS="20", QUICKSTART_NPROC="2",
        QUICKSTART_DEVICE="cpu", QUICKSTART_CORPUS_MB="0.3", QUICKSTART_LOG_INTERVAL="5",
        QUICKSTART_GEN_TOKENS="8",
    )  # fmt: skip
    first = _bash(QUICKSTART, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert re.findall(r"^==> step: ([\w-]+)", out, re.M) == STEPS
    losses = _losses(out)
    assert len(losses) == 4, out[-3000:]
    assert losses[-1] < losses[0] - 0.3, losses
    ckpt = work / "checkpoints" / "gpt_0.3mb_v3000_it20"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "20"
    assert (ckpt / "iter_0000020" / "meta.json").is_file()
    samples = re.findall(r"^--- prompt: '([^']*)'\n(.*)$", out, re.M)
    assert [p for p, _ in samples] == [
        "Return the number of", "This module provides", "Raise ValueError if"
    ]  # fmt: skip
    assert all(text.startswith(p) and len(text) > len(p) for p, text in samples), samples
    assert "==> done: lm loss" in out

    again = _bash(QUICKSTART, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("    reusing ") == 4  # corpus, tokenizer, data, checkpoint
    assert "--- prompt: 'Return the number of'" in again.stdout


def test_quickstart_rejects_bad_knobs(tmp_path):
    out = _bash(QUICKSTART, _env(QUICKSTART_NPROC="3", QUICKSTART_WORK=str(tmp_path)))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: QUICKSTART_NPROC=3: use 1, 2, 4 or 8 (it must divide the 8 attention heads)"
    ]


def test_launch_script_cpu_smoke(tmp_path):
    """One script launched for real (torchrun, 2 CPU processes); the Llama one has the most
    distinct flags. The GPT scripts' smoke flag sets run in-process below."""
    out = _bash(os.path.join(EXAMPLES, SCRIPTS[2]), _env(CPU_SMOKE="1", OUTPUT_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _losses(out.stdout)
    assert len(losses) == 3 and all(0 < x < 20 for x in losses), out.stdout[-3000:]
    (ckpt,) = (tmp_path / "checkpoint").iterdir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert "validation loss at the end of training" in out.stdout


def _pretrain(argv: list[str]) -> list[float]:
    import pretrain_gpt

    return pretrain_gpt.main(argv)


@pytest.mark.parametrize("script", SCRIPTS[:2])
def test_cpu_smoke_flags_train_in_process(script, tmp_path):
    """CPU_SMOKE's command line, run on the session's 2-rank gloo world (no start-up cost)."""
    out = _bash(
        os.path.join(EXAMPLES, script), _env(CPU_SMOKE="1", DRY_RUN="1", OUTPUT_DIR=str(tmp_path))
    )
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout.strip().splitlines()[-1])
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    argv = cmd[cmd.index(os.path.join(ROOT, "pretrain_gpt.py")) + 1 :]
    for losses in get_world(2).run(_pretrain, argv):
        assert len(losses) == 3 and all(0 < x < 20 for x in losses), losses
    (ckpt,) = (tmp_path / "checkpoint").iterdir()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def _full_size_args(script: str, tmp_path, **env: str):
    """The script's real (GPU) command line from DRY_RUN, parsed and validated as rank 0."""
    out = _bash(
        os.path.join(EXAMPLES, script),
        _env(DRY_RUN="1", MOCK_DATA="1", OUTPUT_DIR=str(tmp_path), **env),
    )
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout.strip().splitlines()[-1])
    argv = cmd[cmd.index(os.path.join(ROOT, "pretrain_gpt.py")) + 1 :]
    args = build_parser().parse_args(argv)
    args.rank, args.local_rank = 0, 0
    args.world_size = int(cmd[cmd.index("--nproc-per-node") + 1])
    validate_args(args)
    return cmd, args


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("sp, precision", [(8, "bf16"), (4, "fp16")])
def test_full_size_flags_validate_on_8_gpus(script, sp, precision, tmp_path):
    cmd, args = _full_size_args(
        script, tmp_path, GPUS_PER_NODE="8", SP_SIZE=str(sp), PRECISION=precision
    )
    assert args.ds_sequence_parallel_size == sp and args.data_parallel_size == 8 // sp
    assert args.global_batch_size == 8 // sp and args.micro_batch_size == 1
    assert (args.bf16, args.fp16) == (precision == "bf16", precision == "fp16")
    assert args.use_flash_attn and args.recompute_granularity == "full"
    with open(args.deepspeed_config) as f:
        cfg = json.load(f)
    assert cfg["zero_optimization"]["stage"] == args.zero_stage
    assert cfg[precision]["enabled"] is True
    if "llama" in script:
        assert args.seq_length == 131072 and args.zero_stage == 3
        assert args.normalization == "RMSNorm" and args.swiglu and not args.add_bias_linear
        assert args.num_key_value_heads == 8 and args.rotary_position_embeddings_theta == 5e5
        assert args.untie_embeddings_and_output_weights
    else:
        assert args.seq_length == 32768 and args.vocab_size == 50257
        assert args.lr_warmup_tokens == 3_000_000_000 and args.lr_decay_style == "cosine"


def test_script_knobs(tmp_path):
    _, args = _full_size_args(
        SCRIPTS[1], tmp_path, GPUS_PER_NODE="4", NUM_LAYERS="8", ZERO_STAGE="2",
        CHECKPOINT_ACTIVATIONS="0", ATTN="triton", TRAIN_ITERS="10", GLOBAL_BATCH="8",
        EXTRA_ARGS="--log-interval 1",
    )  # fmt: skip
    assert (args.num_layers, args.zero_stage, args.recompute_granularity) == (8, 2, None)
    assert args.use_flash_attn_triton and not args.use_flash_attn
    assert (args.train_iters, args.global_batch_size, args.log_interval) == (10, 8, 1)
    assert args.cross_entropy_loss_fusion and args.fused_residual_norm  # FUSED=1 by default
    _, args = _full_size_args(SCRIPTS[0], tmp_path, GPUS_PER_NODE="4", FUSED="0")
    assert not (args.cross_entropy_loss_fusion or args.fused_residual_norm)
    bad = _bash(
        os.path.join(EXAMPLES, SCRIPTS[0]),
        _env(CPU_SMOKE="1", CPU_NPROC="2", SP_SIZE="3", OUTPUT_DIR=str(tmp_path)),
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: SP_SIZE=3 does not divide the 2 processes (GPUS_PER_NODE=2 x NNODES=1)"
    ]
    missing = _bash(os.path.join(EXAMPLES, SCRIPTS[0]), _env(GPUS_PER_NODE="8", PRECISION="bf16",
                    DATA_PATH=str(tmp_path / "nope"), OUTPUT_DIR=str(tmp_path)))  # fmt: skip
    assert missing.returncode == 2 and "MOCK_DATA=1" in missing.stderr
