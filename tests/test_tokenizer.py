"""Tokenizers: exact GPT-2 ids, SentencePiece conventions, local HF files, null ids, errors."""

import argparse
import io
import json
import os
from functools import lru_cache

import pytest
import sentencepiece as spm

from megatron.errors import UsageError
from megatron.tokenizer import build_tokenizer, create_tokenizer, vocab_size_with_padding

GPT2_DIR = os.path.join(os.path.dirname(__file__), "data", "gpt2")
VOCAB = os.path.join(GPT2_DIR, "vocab.json")
MERGES = os.path.join(GPT2_DIR, "merges.txt")

# Ids of the real GPT-2 vocabulary. "Hello world" is the well-known [15496, 995]; the others
# were computed once with the independent pure-Python reference below and are re-checked
# against it in test_gpt2_matches_reference_bpe.
GPT2_CASES = [
    ("Hello world", [15496, 995]),
    (" Hello world", [18435, 995]),
    # The literal text of the EOD token is ordinary text (as in Megatron), not id 50256.
    ("<|endoftext|>", [27, 91, 437, 1659, 5239, 91, 29]),
    (
        "It's 2024; they'll pay $3.50 for 12,345 items... don't you think?",
        [1026, 338, 48609, 26, 484, 1183, 1414, 720, 18, 13, 1120, 329, 1105, 11, 27712, 3709]
        + [986, 836, 470, 345, 892, 30],
    ),
    ("café 😀\n\n  x", [66, 1878, 2634, 30325, 222, 628, 220, 2124]),
]


def _args(**kw):
    base = dict(
        tokenizer_type=None,
        vocab_file=None,
        merge_file=None,
        tokenizer_model=None,
        vocab_size=None,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def _gpt2():
    return create_tokenizer(
        _args(tokenizer_type="GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    )


# --- an independent GPT-2 BPE (OpenAI's published algorithm), for cross-checking only -------


@lru_cache(maxsize=1)
def _reference_tables():
    byte_chars = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    byte_chars += list(range(0xAE, 0xFF + 1))
    chars = byte_chars[:]
    extra = 0
    for b in range(256):
        if b not in byte_chars:
            byte_chars.append(b)
            chars.append(256 + extra)
            extra += 1
    byte_encoder = {b: chr(c) for b, c in zip(byte_chars, chars)}
    with open(VOCAB, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(MERGES, encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    ranks = {pair: i for i, pair in enumerate(merges)}
    return byte_encoder, encoder, ranks


def _reference_bpe_ids(text):
    regex = pytest.importorskip("regex")
    byte_encoder, encoder, ranks = _reference_tables()
    pattern = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )
    ids = []
    for piece in pattern.findall(text):
        word = [byte_encoder[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [
                (ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))
            ]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            first, second = word[i], word[i + 1]
            merged, j = [], 0
            while j < len(word):
                if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                    merged.append(first + second)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            word = merged
        ids.extend(encoder[token] for token in word)
    return ids


REFERENCE_TEXTS = [
    "Hello world",
    " Hello world",
    "Ünïcödé café — naïve “quotes” 😀 日本語\n\nSecond  paragraph\twith tabs\n",
    "It's 2024; they'll pay $3.50 for 12,345 items... don't you think?",
    "    def f(x):\n        return x ** 2  # comment\n",
]


def test_gpt2_known_ids():
    tok = _gpt2()
    for text, ids in GPT2_CASES:
        assert tok.tokenize(text) == ids, text
    assert tok.eod == 50256 and tok.vocab_size == 50257 and tok.pad == 50256


def test_gpt2_matches_reference_bpe():
    tok = _gpt2()
    for text in REFERENCE_TEXTS:
        expected = _reference_bpe_ids(text)
        assert tok.tokenize(text) == expected, text
        assert tok.detokenize(expected) == text
    assert tok.tokenize_batch(REFERENCE_TEXTS) == [tok.tokenize(t) for t in REFERENCE_TEXTS]


def test_build_tokenizer_pads_vocab():
    args = _args(tokenizer_type="GPT2BPETokenizer", vocab_file=VOCAB, merge_file=MERGES)
    tok = build_tokenizer(args)
    assert tok.vocab_size == 50257 and args.padded_vocab_size == 50304
    args.tensor_model_parallel_size = 2
    build_tokenizer(args)
    assert args.padded_vocab_size == 50432  # multiple of 128 * 2
    assert vocab_size_with_padding(256, 128, 1) == 256


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(tokenizer_type="GPT2BPETokenizer", merge_file=MERGES), "--vocab-file"),
        (
            dict(tokenizer_type="GPT2BPETokenizer", vocab_file="/nope/v.json", merge_file=MERGES),
            "/nope/v.json",
        ),
        (
            dict(tokenizer_type="GPT2BPETokenizer", vocab_file=VOCAB, merge_file="/nope/m.txt"),
            "--merge-file /nope/m.txt",
        ),
        (
            dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="/nope/a.model"),
            "--tokenizer-model /nope/a.model",
        ),
        (dict(tokenizer_type="GPTSentencePieceTokenizer"), "--tokenizer-model"),
        (
            dict(tokenizer_type="HFTokenizer", tokenizer_model="/nope/tok"),
            "--tokenizer-model /nope/tok",
        ),
        (dict(tokenizer_type="HFTokenizer"), "--tokenizer-model"),
        (dict(tokenizer_type="NullTokenizer"), "--vocab-size"),
        (dict(tokenizer_type="Nope"), "--tokenizer-type Nope"),
        (dict(tokenizer_type=None), "--tokenizer-type is required"),
    ],
)
def test_missing_files_name_the_flag(kwargs, flag):
    with pytest.raises(UsageError, match=flag.replace(".", r"\.")):
        create_tokenizer(_args(**kwargs))


def test_bad_files_are_usage_errors(tmp_path):
    junk = tmp_path / "junk"
    junk.write_text("not a model")
    with pytest.raises(UsageError, match="--tokenizer-model"):
        create_tokenizer(_args(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(junk)))
    with pytest.raises(UsageError, match="--vocab-file"):
        create_tokenizer(
            _args(tokenizer_type="GPT2BPETokenizer", vocab_file=str(junk), merge_file=MERGES)
        )
    with pytest.raises(UsageError, match="--tokenizer-model"):
        create_tokenizer(_args(tokenizer_type="HFTokenizer", tokenizer_model=str(junk)))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece BPE model trained on a few KB (well under a second)."""
    words = "the quick brown fox jumps over lazy dog and cat sat on mat".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=64,
        model_type="bpe",
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_sentencepiece_megatron_special_tokens(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = create_tokenizer(_args(tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model))
    # <CLS>, <SEP>, <EOD>, <MASK>, <PAD> are new; the model's <s> and </s> serve as bos/eos.
    assert tok.vocab_size == len(sp) + 5
    assert tok.eod == len(sp) + 2 and tok.pad == len(sp) + 4
    assert tok.bos == sp.bos_id() and tok.eos == sp.eos_id()
    ids = tok.tokenize("the cat<EOD>sat on the mat")
    assert ids == sp.encode_as_ids("the cat") + [tok.eod] + sp.encode_as_ids("sat on the mat")
    assert tok.detokenize(ids) == "the cat <EOD> sat on the mat"
    assert tok.tokenize_batch(["the dog", "a cat"]) == [
        tok.tokenize("the dog"),
        tok.tokenize("a cat"),
    ]


def test_gpt_sentencepiece(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = create_tokenizer(
        _args(tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    )
    assert tok.vocab_size == len(sp) and tok.eod == sp.eos_id()
    assert tok.tokenize("the lazy dog") == sp.encode_as_ids("the lazy dog")
    assert tok.detokenize(tok.tokenize("the lazy dog")) == "the lazy dog"
    assert tok.tokenize_batch(["the", "dog"]) == [sp.encode_as_ids("the"), sp.encode_as_ids("dog")]


def _gpt2_tokenizer_json(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE.from_file(VOCAB, MERGES))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.save(str(path))


def test_hf_tokenizer_json_file_and_directory(tmp_path):
    _gpt2_tokenizer_json(tmp_path / "tokenizer.json")
    for model in (tmp_path / "tokenizer.json", tmp_path):
        tok = create_tokenizer(_args(tokenizer_type="HFTokenizer", tokenizer_model=str(model)))
        assert tok.tokenize("Hello world") == [15496, 995]
        assert tok.eod == 50256 and tok.vocab_size == 50257
        assert tok.detokenize([15496, 995]) == "Hello world"
    # A tokenizer_config.json beside it decides the EOD token.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "!"}}))
    tok = create_tokenizer(_args(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path)))
    assert tok.eod == 0  # "!" is id 0 in GPT-2


def test_hf_tokenizer_without_eod_is_a_usage_error(tmp_path):
    from tokenizers import Tokenizer, models

    tk = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.save(str(tmp_path / "t.json"))
    with pytest.raises(UsageError, match="end-of-document token"):
        create_tokenizer(
            _args(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path / "t.json"))
        )


def test_hf_tokenizer_saved_directory_via_transformers(tmp_path, sp_model):
    """A directory without tokenizer.json goes through AutoTokenizer (local files only)."""
    pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(open(sp_model, "rb").read())
    config = {"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>", "bos_token": "<s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = create_tokenizer(_args(tokenizer_type="HFTokenizer", tokenizer_model=str(tmp_path)))
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.eod == sp.eos_id() and tok.vocab_size == len(sp)
    ids = tok.tokenize("the lazy dog")
    assert sp.decode_ids([i for i in ids if i != sp.bos_id()]) == "the lazy dog"


def test_null_tokenizer():
    tok = create_tokenizer(_args(tokenizer_type="NullTokenizer", vocab_size=100))
    assert tok.eod == 100 and tok.vocab_size == 101 and tok.pad == 100
    assert tok.tokenize(" 5 17\n3 ") == [5, 17, 3]
    assert tok.detokenize([5, 17, 100]) == "5 17 100"
    with pytest.raises(UsageError, match="'x' is not an integer"):
        tok.tokenize("1 x 2")
    with pytest.raises(UsageError, match="outside 0..100"):
        tok.tokenize("101")
