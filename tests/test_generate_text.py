"""tools/generate_text.py and megatron.inference.text_generation: sampling from a saved checkpoint.

A tiny GPT (NullTokenizer, vocabulary 121 padded to 128) is trained for two iterations and
saved; generation then runs in the session's one-rank gloo world (as a single process).
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from dist_helper import get_world
from train_utils import run_training

from megatron.errors import UsageError
from megatron.inference.text_generation import SamplingParams, filter_logits, generate, sample_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "generate_text.py")
REAL_VOCAB = 121  # NullTokenizer --vocab-size 120: ids 0..119 plus EOD 120
PROMPT = "5 17 3 99"


def _tool():
    spec = importlib.util.spec_from_file_location("generate_text_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gen_args(ckpt: str, *extra: str) -> list[str]:
    return ["--load", ckpt, "--use-checkpoint-args", "--device", "cpu", "--prompt", PROMPT,
            "--max-new-tokens", "12", "--no-stop-at-eod", *extra]  # fmt: skip


# ---- run on the one-rank world (picklable, module level) ----
def _generate_texts(args_list: list[str]) -> list[str]:
    gt = _tool()
    args = gt.initialize_for_generation(args_list)
    model, tokenizer = gt.load_model(args)
    return gt.generate_all(args, model, tokenizer, gt.read_prompts(args))


def _greedy_and_argmax(args_list: list[str]) -> tuple[list[int], list[int], int]:
    """Greedy ids from generate(), and the argmax of one forward over prompt + those ids."""
    gt = _tool()
    args = gt.initialize_for_generation(args_list)
    model, tokenizer = gt.load_model(args)
    prompt = tokenizer.tokenize(PROMPT)
    new = generate(
        model, prompt, 12, tokenizer.vocab_size, SamplingParams(0.0), max_context=args.seq_length
    )
    full = torch.tensor([prompt + new])
    with torch.no_grad():
        logits_sv = model(full, torch.arange(full.shape[1]).unsqueeze(0))[0]  # [s, padded_vocab]
    expected = logits_sv[len(prompt) - 1 : -1, : tokenizer.vocab_size].argmax(-1).tolist()
    return new, expected, args.padded_vocab_size


class _PaddingLover(torch.nn.Module):
    """Wraps a model so that the padded vocabulary ids get by far the largest logits."""

    def __init__(self, model: torch.nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    def forward(self, tokens, position_ids):
        logits = self.model(tokens, position_ids).clone()
        logits[..., self.vocab_size :] += 1e4
        return logits


def _sample_with_padding_bias(args_list: list[str]) -> list[int]:
    gt = _tool()
    args = gt.initialize_for_generation(args_list)
    model, tokenizer = gt.load_model(args)
    wrapped = _PaddingLover(model, tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(0)
    out = []
    for params in (SamplingParams(1.0), SamplingParams(0.0), SamplingParams(2.0, 5, 0.9)):
        out += generate(
            wrapped, tokenizer.tokenize(PROMPT), 40, tokenizer.vocab_size, params,
            max_context=args.seq_length, generator=generator,
        )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gen") / "ckpt")
    get_world(1).run(run_training, f"--train-iters 2 --lr-warmup-iters 1 --save {path}")
    return path


def _run(fn, *args):
    return get_world(1).run(fn, *args)[0]


def test_seeded_sampling_is_deterministic(ckpt):
    a = _run(_generate_texts, _gen_args(ckpt, "--temperature", "1.0", "--seed", "11"))
    b = _run(_generate_texts, _gen_args(ckpt, "--temperature", "1.0", "--seed", "11"))
    c = _run(_generate_texts, _gen_args(ckpt, "--temperature", "1.0", "--seed", "12"))
    assert a == b
    assert a != c  # 12 draws from ~121 near-uniform ids: another seed differs
    assert a[0].startswith(PROMPT) and len(a[0].split()) == len(PROMPT.split()) + 12


def test_greedy_is_argmax_of_the_logits(ckpt):
    new, expected, padded = _run(_greedy_and_argmax, _gen_args(ckpt))
    assert padded == 128
    assert len(new) == 12 and new == expected


def test_top_k_1_equals_greedy(ckpt):
    greedy = _run(_generate_texts, _gen_args(ckpt, "--temperature", "0"))
    top1 = _run(_generate_texts, _gen_args(ckpt, "--temperature", "1.5", "--top-k", "1"))
    assert greedy == top1


def test_padded_vocab_is_never_sampled(ckpt):
    ids = _run(_sample_with_padding_bias, _gen_args(ckpt))
    assert len(ids) == 120 and max(ids) < REAL_VOCAB


def test_cli_prints_prompt_and_continuation(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3\n\n4 5\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, TOOL, "--load", ckpt, "--use-checkpoint-args", "--device", "cpu",
           "--prompt-file", str(prompts), "--max-new-tokens", "5", "--temperature", "0"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--- prompt: '1 2 3'" in out.stdout and "--- prompt: '4 5'" in out.stdout
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(["--prompt", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --load DIR is required: the checkpoint directory to sample from"
    ]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--ds-sequence-parallel-size", "2"], "--ds-sequence-parallel-size"),
    ],
)
def test_bad_flags_are_usage_errors(ckpt, extra, match):
    with pytest.raises(UsageError, match=match):
        _tool().initialize_for_generation(_gen_args(ckpt, *extra))


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no latest_checkpointed_iteration.txt"):
        _tool().initialize_for_generation(["--load", str(tmp_path), "--prompt", "1"])


def test_model_flags_or_checkpoint_args_are_required(ckpt):
    with pytest.raises(UsageError, match="--num-layers is required.*--use-checkpoint-args"):
        _tool().initialize_for_generation(["--load", ckpt, "--prompt", "1"])


def test_explicit_model_flags_match_checkpoint_args(ckpt):
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
             "--seq-length", "64", "--tokenizer-type", "NullTokenizer", "--vocab-size", "120"]  # fmt: skip
    explicit = _gen_args(ckpt, "--temperature", "0")
    explicit.remove("--use-checkpoint-args")
    assert _run(_generate_texts, explicit + flags) == _run(
        _generate_texts, _gen_args(ckpt, "--temperature", "0")
    )


# ---- the sampling functions on their own ----
def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = filter_logits(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [[False, True, True, False]]
    # probs ~ [0.03, 0.64, 0.24, 0.09]: 0.5 needs only the top id, 0.8 the top two.
    assert filter_logits(logits, 0, 0.5).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, 0, 0.8).isfinite().tolist() == [[False, True, True, False]]
    assert filter_logits(logits, 0, 1.0).isfinite().all()


def test_sample_next_greedy_and_seeded():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    assert sample_next(logits, SamplingParams(0.0)).tolist() == logits.argmax(-1).tolist()
    draw = [sample_next(logits, SamplingParams(1.0, 10, 0.9), torch.Generator().manual_seed(5))
            for _ in range(2)]  # fmt: skip
    assert torch.equal(draw[0], draw[1])
    top10 = logits.topk(10, dim=-1).indices
    assert all(int(draw[0][i]) in top10[i].tolist() for i in range(3))
