"""Golden loss curves in their tiny CPU form: record, tolerance, PASS, FAIL, not comparable."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from dist_helper import get_world

from megatron.validate import golden, golden_corpus

TINY = ["--tiny", "--device", "cpu"]


def _golden(argv: list[str]) -> tuple[int, str]:
    """``golden.main(argv)`` with its printed lines (run on a one-rank world)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = golden.main(argv)
    return code, out.getvalue()


def _run(argv: list[str]) -> tuple[int, str]:
    """``_golden`` where it trains (a process group of its own); the rest runs here."""
    return get_world(1).run(_golden, argv)[0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny corpus and the two recorded fp32 curves: (work dir, golden dir)."""
    work = str(tmp_path_factory.mktemp("golden_work"))
    gold = str(tmp_path_factory.mktemp("golden"))
    for seed in golden.SEEDS:
        argv = ["--model", "gpt", "--precision", "fp32", "--seed", str(seed), "--record"]
        code, out = _run([*argv, *TINY, "--work", work, "--golden-dir", gold])
        assert code == 0, out
    return work, gold


def _args(work: str, gold: str) -> list[str]:
    return ["--model", "gpt", "--precision", "fp32", *TINY, "--work", work, "--golden-dir", gold]


def test_record_then_compare_passes(recorded):
    work, gold = recorded
    tol = json.load(open(f"{gold}/gpt-tiny_tolerance.json"))
    assert tol["tolerance"] == pytest.approx(3 * tol["largest_seed_gap"]) and tol["tolerance"] > 0
    curve = json.load(open(f"{gold}/gpt-tiny_fp32_seed1234.json"))
    assert len(curve["losses"]) == golden.TINY.iterations
    assert curve["environment"]["torch"] == torch.__version__
    assert "--no-bias-gelu-fusion" in curve["pretrain_args"] and len(curve["corpus_sha256"]) == 64
    code, out = _run(_args(work, gold))
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith("PASS gpt fp32 seed 1234 vs fp32 seed 1234")


def test_perturbed_curve_fails(recorded, tmp_path):
    work, gold = recorded
    shutil.copytree(gold, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "gpt-tiny_fp32_seed1234.json"
    curve = json.loads(path.read_text())
    tol = json.loads((tmp_path / "gpt-tiny_tolerance.json").read_text())["tolerance"]
    curve["losses"][-10:] = [x + 2 * tol + 0.1 for x in curve["losses"][-10:]]
    path.write_text(json.dumps(curve))
    code, out = _run(_args(work, str(tmp_path)))
    assert code == 1, out
    lines = out.strip().splitlines()
    assert lines[-1].startswith("FAIL") and "at iteration 30" in lines[-1]
    assert lines[-2].startswith("iteration    30:") and lines[-2].endswith("over")


def test_changed_corpus_hash_is_not_comparable(recorded, tmp_path):
    work, gold = recorded
    shutil.copytree(gold, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "gpt-tiny_fp32_seed1234.json"
    curve = json.loads(path.read_text())
    now, curve["corpus_sha256"] = curve["corpus_sha256"], "0" * 64
    path.write_text(json.dumps(curve))
    code, out = _golden(_args(work, str(tmp_path)))
    assert code == 3
    assert out.strip().splitlines()[-1] == (
        f"not comparable: corpus_sha256 recorded {'0' * 64}, now {now}"
    )
    assert "train:" not in out  # refused before training


def test_corpus_is_reproducible(recorded, tmp_path):
    """A second build elsewhere gives the same corpus and tokenizer bytes."""
    work, _ = recorded
    spec = golden_corpus.CorpusSpec(golden.TINY.vocab_size, golden.TINY.max_files)
    first, reused = golden_corpus.prepare(work, spec, 2)
    assert reused
    second, reused = golden_corpus.prepare(str(tmp_path), spec, 2)
    assert not reused
    assert (second.corpus_sha256, second.tokenizer_sha256, second.tokens) == (
        first.corpus_sha256,
        first.tokenizer_sha256,
        first.tokens,
    )


def test_too_small_corpus_is_refused(tmp_path):
    argv = _args(str(tmp_path / "work"), str(tmp_path / "gold"))
    code, out = _golden([*argv, "--record", "--corpus-files", "1"])
    assert code == 2
    (line,) = out.strip().splitlines()[1:]
    assert line.startswith("error: the corpus has") and "one epoch at most" in line
    assert not (tmp_path / "gold").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_no_cuda_device_is_one_line():
    code, out = _golden(["--model", "llama", "--precision", "bf16"])
    assert code == 2 and out == "error: --device cuda: no CUDA device is visible here\n"
