"""HF import/export: logits equal transformers', round trips are exact, bad input is one line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_utils import LLAMA, tiny_config  # noqa: E402

from megatron.checkpointing.checkpointing import load_checkpoint  # noqa: E402
from megatron.checkpointing.hf_conversion import args_from_config  # noqa: E402
from megatron.checkpointing.hf_conversion_io import (  # noqa: E402
    export_checkpoint,
    load_model_state,
    save_model_checkpoint,
)
from megatron.errors import UsageError  # noqa: E402
from megatron.model import GPTModel, ModelConfig  # noqa: E402

SEQ = 16
VOCAB = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "checkpoint_convert.py")
_spec = importlib.util.spec_from_file_location("checkpoint_convert_tool", TOOL)
checkpoint_convert = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checkpoint_convert)


def _tokens(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _ours(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    return model.eval()(tokens, torch.arange(SEQ).expand_as(tokens))


@torch.no_grad()
def _theirs(model, tokens: torch.Tensor) -> torch.Tensor:
    return model.eval()(tokens).logits


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, f"relative error {err:.2e}"


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norms and biases too (inits leave them at 1 and 0, hiding layout mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))


# ---- HF -> ours ----
def _hf_model(kind: str, directory: str):
    """A small random HF model; "gpt2" uses exact GeLU, "gpt2-tanh" GPT-2's own gelu_new."""
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
            intermediate_size=176, vocab_size=VOCAB, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=8, vocab_size=VOCAB, n_positions=64,
            activation_function="gelu_new" if kind == "gpt2-tanh" else "gelu",
            bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    _perturb(model, 1)
    model.save_pretrained(directory)
    return model.eval()


def _model_from_flags(flags: list[str]) -> ModelConfig:
    """What pretrain_gpt.py builds from the printed flags (through parse and validate)."""
    from megatron.initialize.argument_checks import validate_args
    from megatron.initialize.arguments import parse_args
    from megatron.tokenizer import vocab_size_with_padding

    args = parse_args(args_list=flags + ["--micro-batch-size", "1"])
    validate_args(args)
    args.padded_vocab_size = vocab_size_with_padding(VOCAB, args.make_vocab_size_divisible_by, 1)
    return ModelConfig.from_args(args)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt2-tanh"])
def test_import_matches_transformers(kind, tmp_path, capsys):
    hf = _hf_model(kind, str(tmp_path / "hf"))
    save = str(tmp_path / "ck")
    assert (
        checkpoint_convert.main(["import", "--hf-dir", str(tmp_path / "hf"), "--save", save]) == 0
    )
    printed = capsys.readouterr().out
    flags = shlex.split(printed.split("--finetune", 1)[1].replace("...", ""))
    if kind == "llama":
        for flag in ("--swiglu", "--normalization RMSNorm", "--num-key-value-heads 2"):
            assert flag in printed
    config = _model_from_flags(flags)
    model = GPTModel(config)
    # The training path: load_checkpoint with --finetune into a model built from the flags.
    args = argparse.Namespace(
        load=save, finetune=True, no_load_optim=False, exit_on_missing_checkpoint=False
    )
    optimizer = torch.optim.AdamW(model.parameters())
    load_checkpoint(args, None, model, optimizer, None, None, None)
    tokens = _tokens()
    _assert_close(_ours(model, tokens), _theirs(hf, tokens))


# ---- ours -> HF ----
EXPORT_CASES = {
    "llama_gqa_untied": dict(LLAMA, untie_embeddings_and_output_weights=True),
    "llama_bias_tied_wide_heads": dict(LLAMA, add_bias_linear=True, kv_channels=16),
    "gpt2_tied": {},
    "gpt2_untied_no_bias": {"untie_embeddings_and_output_weights": True, "add_bias_linear": False},
}


def _our_checkpoint(save: str, **overrides) -> GPTModel:
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    model = GPTModel(config)
    _perturb(model, 2)
    save_model_checkpoint(
        model.state_dict(), save, args_from_config(config, make_vocab_size_divisible_by=128)
    )
    return model


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_matches_transformers(case, tmp_path):
    model = _our_checkpoint(str(tmp_path / "ck"), **EXPORT_CASES[case])
    out = str(tmp_path / "hf")
    shard = 64 * 1024 if case == "llama_gqa_untied" else None  # exercise the sharded layout
    files = export_checkpoint(str(tmp_path / "ck"), out, "hf", max_shard_bytes=shard)
    if shard:
        assert "model.safetensors.index.json" in os.listdir(out) and len(files) > 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    expected = "LlamaForCausalLM" if case.startswith("llama") else "GPT2LMHeadModel"
    assert type(hf).__name__ == expected
    tokens = _tokens()
    _assert_close(_ours(model, tokens), _theirs(hf, tokens))


@pytest.mark.parametrize("case", ["llama_gqa_untied", "gpt2_tied"])
def test_round_trip_is_exact(case, tmp_path):
    model = _our_checkpoint(str(tmp_path / "ck"), **EXPORT_CASES[case])
    export_checkpoint(str(tmp_path / "ck"), str(tmp_path / "hf"), "hf")
    checkpoint_convert.main(["import", "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "back")])  # fmt: skip
    original, (back, meta, _) = model.state_dict(), load_model_state(str(tmp_path / "back"))
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    saved = args_from_config(model.config)
    assert {k: meta["args"][k] for k in saved} == saved
    # Trimmed to the tokenizer's 120 ids, then padded back to 128 with zero rows.
    export_checkpoint(str(tmp_path / "ck"), str(tmp_path / "hf120"), "hf", vocab_size=120)
    assert json.load(open(tmp_path / "hf120" / "config.json"))["vocab_size"] == 120
    checkpoint_convert.main(["import", "--hf-dir", str(tmp_path / "hf120"), "--save", str(tmp_path / "b120")])  # fmt: skip
    emb = load_model_state(str(tmp_path / "b120"))[0]["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:120], original["embedding.word_embeddings.weight"][:120])
    assert emb.shape[0] == 128 and not emb[120:].any()


def test_consolidated_export(tmp_path):
    from safetensors.torch import load_file

    model = _our_checkpoint(str(tmp_path / "ck"), position_embedding_type="rope")  # no HF twin
    out = tmp_path / "flat"
    args = ["export", "--load", str(tmp_path / "ck"), "--output", str(out)]
    assert checkpoint_convert.main(args + ["--format", "consolidated"]) == 0
    tensors = load_file(out / "model.safetensors")
    original = model.state_dict()
    assert sorted(tensors) == sorted(original)
    assert all(torch.equal(tensors[k], original[k]) for k in original)
    saved = json.load(open(out / "config.json"))["megatron_ulysses_args"]
    assert saved["position_embedding_type"] == "rope" and saved["normalization"] == "LayerNorm"


def test_refused_architecture_is_one_line(tmp_path, capsys):
    _our_checkpoint(str(tmp_path / "ck"), position_embedding_type="rope")  # rope + LayerNorm
    out = str(tmp_path / "hf")
    argv = ["export", "--load", str(tmp_path / "ck"), "--output", out]
    assert checkpoint_convert.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert "--position-embedding-type rope --normalization LayerNorm" in err
    assert "--format consolidated" in err and not os.path.exists(os.path.join(out, "config.json"))


def test_import_refuses_bad_directories(tmp_path):
    from megatron.checkpointing.hf_conversion_io import import_hf

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UsageError, match="pickled weights"):
        import_hf(str(hf), str(tmp_path / "ck"))
    _hf_model("gpt2", str(hf))
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, model_type="mamba")))
    with pytest.raises(UsageError, match="model_type 'mamba' is not supported"):
        import_hf(str(hf), str(tmp_path / "ck"))


def test_gpt2_tokenizer_files_exported(tmp_path):
    from megatron.tokenizer.gpt2_tokenizer import GPT2BPETokenizer

    data = os.path.join(os.path.dirname(__file__), "data", "gpt2")
    vocab, merges = os.path.join(data, "vocab.json"), os.path.join(data, "merges.txt")
    model = _our_checkpoint(str(tmp_path / "ck"))
    meta_path = tmp_path / "ck" / "iter_0000000" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["args"].update(tokenizer_type="GPT2BPETokenizer")
    meta_path.write_text(json.dumps(meta))
    out = str(tmp_path / "hf")
    flags = {"vocab_file": vocab, "merge_file": merges}  # export's --vocab-file, --merge-file
    files = export_checkpoint(str(tmp_path / "ck"), out, "hf", tokenizer_flags=flags)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    text = "Hello world, this is a   test of GPT-2 BPE.\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text)["input_ids"] == GPT2BPETokenizer(vocab, merges).tokenize(text)
    assert hf_tok.eos_token == "<|endoftext|>"
    assert json.load(open(os.path.join(out, "config.json")))["eos_token_id"] is None  # 50256 > 128
    # Importing it back pads to what the tokenizer needs: 50257 ids -> 50304 rows.
    from megatron.checkpointing.hf_conversion_io import import_hf

    _, flags = import_hf(out, str(tmp_path / "back"))
    assert f"--tokenizer-model {os.path.abspath(out)}" in flags
    emb = load_model_state(str(tmp_path / "back"))[0]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 50304 and not emb[VOCAB:].any()
    assert torch.equal(emb[:VOCAB], model.state_dict()["embedding.word_embeddings.weight"])
