"""tools/preprocess_data.py: round trips with three tokenizers, workers/partitions/gzip giving
identical output, and the errors for bad input."""

import gzip
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from test_indexed_dataset import read_reference_dataset

from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer.gpt2_tokenizer import GPT2BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
VOCAB = os.path.join(ROOT, "tests", "data", "gpt2", "vocab.json")
MERGES = os.path.join(ROOT, "tests", "data", "gpt2", "merges.txt")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _write_jsonl(path, rows, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def _run(tmp_path, rows, extra, raw_lines=(), name="out"):
    src = str(tmp_path / f"{name}.jsonl")
    _write_jsonl(src, rows, raw_lines)
    prefix = str(tmp_path / name)
    rc = tool.main(["--input", src, "--output-prefix", prefix, *extra])
    return rc, src, prefix


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        tool.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--input",
        "--json-keys",
        "--tokenizer-type",
        "--vocab-file",
        "--merge-file",
        "--tokenizer-model",
        "--vocab-size",
        "--append-eod",
        "--output-prefix",
        "--workers",
        "--partitions",
        "--keep-newlines",
        "--log-interval",
        "--skip-malformed",
    ):
        assert flag in text, flag


def test_null_tokenizer_round_trip_counts_eod(tmp_path, caplog):
    rows = [
        {"text": "1 2 3"},
        {"text": ""},  # empty: skipped and counted
        {"text": "4 5", "other": "x"},
        {"text": ["7 8", "", "9"]},  # a list: one sequence per non-empty string
    ]
    with caplog.at_level(logging.INFO):
        rc, _, prefix = _run(
            tmp_path,
            rows,
            ["--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--append-eod"],
            raw_lines=["", "   "],
        )
    assert rc == 0
    dtype, seqs, doc_idx = read_reference_dataset(prefix + "_text_document")
    assert dtype == np.uint16
    assert seqs == [[1, 2, 3, 50], [4, 5, 50], [7, 8], [9, 50]]  # EOD counted in the sizes
    assert doc_idx == [0, 1, 2, 4]
    log = caplog.text
    assert "1 empty documents skipped" in log and "2 blank lines skipped" in log


def test_gpt2_round_trip_and_gpt_dataset(tmp_path):
    texts = [
        "Hello world",
        " Ünïcödé café — “quotes” 😀\n\nNew paragraph\n",
        "It's 2024; they'll pay $3.50.",
    ] * 5
    rc, _, prefix = _run(tmp_path, [{"text": t} for t in texts], [*GPT2_FLAGS, "--append-eod"])
    assert rc == 0
    ds = MMapIndexedDataset(prefix + "_text_document")
    tok = GPT2BPETokenizer(VOCAB, MERGES)
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.tokenize(text) + [50256]
        assert ds.sizes[i] == len(tok.tokenize(text)) + 1
    assert ds[0].tolist() == [15496, 995, 50256]
    gpt = GPTDataset("train", prefix, ds, np.arange(len(ds)), 10, 8, seed=0)
    assert gpt[0]["text"].shape == (9,)


def test_sentencepiece_round_trip_multiple_keys(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    corpus = [" ".join(words[(i + j) % 10] for j in range(6)) for i in range(100)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=48,
        model_type="bpe",
        minloglevel=2,
    )
    model_path = tmp_path / "sp.model"
    model_path.write_bytes(model.getvalue())
    rows = [{"text": corpus[i], "title": words[i % 10]} for i in range(20)]
    flags = ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(model_path)]
    rc, _, prefix = _run(tmp_path, rows, [*flags, "--json-keys", "text", "title", "--append-eod"])
    assert rc == 0
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    for key in ("text", "title"):
        ds = MMapIndexedDataset(f"{prefix}_{key}_document")
        assert [ds[i].tolist() for i in range(20)] == [
            sp.encode_as_ids(r[key]) + [sp.eos_id()] for r in rows
        ]


def _cli(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_workers_partitions_and_gzip_give_identical_output(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the", "data", "pipeline", "tokens", "Ünï", "😀", "\n", "42", "it's"]
    rows = [
        {"text": " ".join(rng.choice(words, size=int(rng.integers(0, 40))))} for _ in range(300)
    ]
    src = str(tmp_path / "in.jsonl")
    _write_jsonl(src, rows)
    with open(src, "rb") as f, gzip.open(src + ".gz", "wb") as g:
        g.write(f.read())
    base = str(tmp_path / "base")
    assert tool.main(["--input", src, "--output-prefix", base, *GPT2_FLAGS, "--append-eod"]) == 0
    runs = {
        "pool": ["--input", src, "--workers", "2"],
        "par": ["--input", src, "--workers", "2", "--partitions", "3"],
        "gz": ["--input", src + ".gz", "--workers", "2", "--partitions", "2"],
    }
    for name, args in runs.items():
        out = str(tmp_path / name)
        result = _cli([*args, "--output-prefix", out, *GPT2_FLAGS, "--append-eod"])
        assert result.returncode == 0, result.stderr
        for ext in (".bin", ".idx"):
            with (
                open(base + "_text_document" + ext, "rb") as a,
                open(out + "_text_document" + ext, "rb") as b,
            ):
                assert a.read() == b.read(), (name, ext)
        assert not [f for f in os.listdir(tmp_path) if "part" in f]  # temporaries removed


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    rows = [{"text": "1 2"}, {"text": "3"}]
    rc, src, prefix = _run(
        tmp_path,
        rows,
        ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
        raw_lines=['{"text": "4"', '{"text": "5"}'],
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"error: {src} line 3: malformed JSON" in err and "--skip-malformed" in err
    assert not os.path.exists(prefix + "_text_document.bin")
    rc, _, prefix = _run(
        tmp_path,
        rows,
        ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--skip-malformed"],
        raw_lines=['{"text": "4"', "[1, 2]", '{"text": "5"}'],
        name="skip",
    )
    assert rc == 0
    _, seqs, _ = read_reference_dataset(prefix + "_text_document")
    assert seqs == [[1, 2], [3], [5]]


@pytest.mark.parametrize("parallel", [["--workers", "2"], ["--workers", "2", "--partitions", "2"]])
def test_errors_from_workers_and_partitions_keep_line_numbers(tmp_path, parallel):
    src = str(tmp_path / "in.jsonl")
    _write_jsonl(src, [{"text": str(i % 10)} for i in range(1500)], raw_lines=["{oops"])
    out = str(tmp_path / "o")
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    result = _cli(["--input", src, "--output-prefix", out, *flags, *parallel])
    assert result.returncode == 2
    assert f"error: {src} line 1501: malformed JSON" in result.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing half-written left behind


def test_missing_key_and_bad_value(tmp_path, capsys):
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]
    rc, src, _ = _run(tmp_path, [{"text": "1"}, {"body": "2"}], flags)
    assert rc == 2
    assert f"error: {src} line 2: missing key 'text' (keys there: body)" in capsys.readouterr().err
    rc, src, _ = _run(tmp_path, [{"text": 5}], flags, name="bad")
    assert rc == 2
    assert f"{src} line 1: key 'text' holds a int" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path):
    result = _cli(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", "x", *GPT2_FLAGS])
    assert result.returncode == 2 and "error: --input" in result.stderr
    src = str(tmp_path / "in.jsonl")
    _write_jsonl(src, [{"text": "hi"}])
    result = _cli(
        [
            "--input",
            src,
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-type",
            "GPT2BPETokenizer",
        ]
    )
    assert result.returncode == 2 and "needs --vocab-file" in result.stderr
    assert "Traceback" not in result.stderr
