"""Bad data, HF directories and tokenizer files: one line each; tokenizer files come only from
a checkpoint's own copy or from flags."""

import contextlib
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from dist_helper import get_world
from test_checkpoint_failures import _attempts, _digests, assert_one_line
from train_utils import TINY_TRAIN

from megatron.data.indexed_dataset import MMapIndexedDatasetBuilder, data_file_path, index_file_path

DATA = "--train-iters 3 --tokenizer-type NullTokenizer --vocab-size 1000 --data-path {} --split {}"


def _dataset(prefix: str, docs: list[list[int]]) -> str:
    builder = MMapIndexedDatasetBuilder(data_file_path(prefix), dtype=np.uint16)
    for doc in docs:
        builder.add_item(doc)
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return prefix


def _run(*extras: str, base: str = TINY_TRAIN) -> list:
    return get_world(1).run(_attempts, list(extras), base)[0]


def test_bad_data_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    gpt2 = _dataset(str(tmp_path / "gpt2"), [list(rng.integers(0, 50000, 100)) + [50256]] * 20)
    fine = _dataset(str(tmp_path / "fine"), [list(rng.integers(0, 1000, 100))] * 20)
    empty = _dataset(str(tmp_path / "empty"), [])
    beyond, again, no_train, no_docs = _run(
        DATA.format(gpt2, "100,0,0"),
        DATA.format(gpt2, "100,0,0"),
        DATA.format(fine, "0,100,0"),
        DATA.format(empty, "100,0,0"),
        base=TINY_TRAIN.replace("--mock-data", ""),
    )
    assert_one_line(beyond, f"{gpt2}.bin", "largest token id 50256", "vocabulary of 1001 ids")
    assert any("-tokens-" in x and "built index maps" in x for x in beyond[3])
    assert not any("-tokens-" in x for x in again[3])  # the scan ran once, then was cached
    assert_one_line(again, f"{gpt2}.bin", "50256")
    assert_one_line(no_train, "--split 0,100,0", "train split is empty")
    assert_one_line(no_docs, f"--data-path {empty}", "no documents")


def test_empty_preprocessing_input_is_an_error(tmp_path):
    from test_preprocess_data import _cli

    for name, text in (("empty.jsonl", ""), ("blank.jsonl", '{"text": ""}\n\n')):
        (tmp_path / name).write_text(text)
        out = _cli(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / name),
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])  # fmt: skip
        errors = [x for x in out.stderr.splitlines() if x.startswith("error: ")]
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert len(errors) == 1 and errors[0].startswith(f"error: --input {tmp_path / name}: ")
        assert not [f for f in os.listdir(tmp_path) if f.startswith(name + "_")]


def _convert(argv: list[str]) -> tuple[int, str]:
    from test_hf_conversion import checkpoint_convert

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = checkpoint_convert.main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize(
    "index, file, match",
    [
        ("{not json", None, "not a JSON object"),
        ('{"metadata": {}}', None, "no 'weight_map'"),
        ('{"weight_map": {"w": "pytorch_model.bin"}}', None, "only .safetensors"),
        ('{"weight_map": {"w": "../x.safetensors"}}', None, "outside the HF directory"),
        ('{"weight_map": {"w": "m.safetensors"}}', "m.safetensors", "not a safetensors file"),
    ],
)
def test_bad_hf_index_is_one_line(tmp_path, index, file, match):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "model.safetensors.index.json").write_text(index)
    if file:
        (hf / file).write_bytes(pickle.dumps({"w": [1.0]}))
    code, err = _convert(["import", "--hf-dir", str(hf), "--save", str(tmp_path / "ck")])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and match in lines[0]
    assert str(hf / (file or "model.safetensors.index.json")) in lines[0]
    assert not os.path.exists(tmp_path / "ck")


# ---- tokenizer files: the checkpoint's own copy, or flags ----
def _hf_tokenizer(directory) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<eos>", "[UNK]", *"a b c d e f g h".split()]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(directory)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<eos>"}, f)
    return str(directory)


def _generate_tokenizer(args_list: list[str]) -> tuple[str, int]:
    from test_generate_text import _tool

    gt = _tool()
    args = gt.initialize_for_generation(args_list)
    _, tokenizer = gt.load_model(args)
    return tokenizer.name, tokenizer.vocab_size


def _export(ck: str, out: str) -> int:
    return _convert(["export", "--load", ck, "--output", out, "--format", "consolidated"])[0]


def test_tokenizer_files_are_saved_and_only_read_from_the_checkpoint(tmp_path):
    tok = _hf_tokenizer(tmp_path / "tok")
    original = open(os.path.join(tok, "tokenizer.json"), "rb").read()
    ck = str(tmp_path / "ck")
    (trained,) = _run(
        f"--train-iters 2 --lr-warmup-iters 1 --tokenizer-type HFTokenizer --tokenizer-model {tok} "
        f"--save {ck}"
    )
    assert trained[0] == 0, trained[1]
    copy = os.path.join(ck, "iter_0000002", "tokenizer")
    assert sorted(os.listdir(copy)) == ["tokenizer.json", "tokenizer_config.json"]
    secret = tmp_path / "secret"
    secret.write_text("not for export")
    shutil.rmtree(tok)  # from now on only the checkpoint's copy exists
    meta_path = os.path.join(ck, "iter_0000002", "meta.json")
    meta = json.load(open(meta_path))
    meta["args"]["tokenizer_model"] = str(secret)
    json.dump(meta, open(meta_path, "w"))
    before = _digests(ck)
    assert _export(ck, f"{tmp_path}/out") == 0
    assert open(f"{tmp_path}/out/tokenizer.json", "rb").read() == original
    # Generation: the checkpoint's copy, unless the command line names a tokenizer.
    gen = ["--load", ck, "--use-checkpoint-args", "--device", "cpu", "--prompt", "a b"]
    assert get_world(1).run(_generate_tokenizer, gen)[0] == ("HFTokenizer", 10)
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
    assert get_world(1).run(_generate_tokenizer, gen + flags)[0] == ("NullTokenizer", 101)
    assert _digests(ck) == before
    # A sentencepiece model named only in meta.json is never copied.
    meta["args"].update(tokenizer_type="SentencePieceTokenizer")
    json.dump(meta, open(meta_path, "w"))
    shutil.rmtree(copy)
    assert _export(ck, f"{tmp_path}/out2") == 0
    assert not os.path.exists(f"{tmp_path}/out2/tokenizer.model")
