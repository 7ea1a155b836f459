"""Megatron-LM and Megatron-DeepSpeed checkpoints: import (logits equal a float64 forward in
Megatron's own layout, Adam state and iteration carried), refusals in one line, ``--load``'s
pointer to the import, export to Megatron-LM's legacy layout, and training continued."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import pytest
import torch
from dist_helper import get_world
from megatron_reference import megatron_logits
from train_utils import run_training

from megatron.checkpointing.checkpointing import find_checkpoint
from megatron.checkpointing.foreign.convert import export_megatron_lm, import_foreign
from megatron.checkpointing.foreign.safe_load import StandIn, safe_torch_load
from megatron.checkpointing.hf_conversion_io import checkpoint_config, load_model_state
from megatron.errors import UsageError
from megatron.model import GPTModel

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "foreign")
sys.path.insert(0, os.path.join(HERE, "fixtures"))
import make_foreign_checkpoints as gen  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CASES = {
    "mlm_legacy_gpt_tp2_fp16": "Megatron-LM legacy torch (TP 2, PP 1)",
    "mlm_core_llama_tp2_pp2": "Megatron-LM legacy torch (TP 2, PP 2)",
    "mlm_torch_dist_llama": "Megatron-LM torch_dist",
    "mds_gpt_zero1_fp16": "Megatron-DeepSpeed (ZeRO 1, DP 2)",
    "mds_llama_pipe_pp2_bf16": "Megatron-DeepSpeed (ZeRO 1 bf16, DP 2, PP 2)",
    "mds_gpt_zero3_fp16": "Megatron-DeepSpeed (ZeRO 3, DP 2)",
    "mds_llama_zero2_contiguous_qkv": "Megatron-DeepSpeed (ZeRO 2, DP 2)",
    "mds_gpt_tp2_zero1_contiguous_qkv": "Megatron-DeepSpeed (ZeRO 1, DP 2, TP 2)",
    "mds_gpt_universal": "Megatron-DeepSpeed (universal)",
}
ORIGINAL_VOCAB = 50  # the universal fixture drops the padding rows beyond it


def _style(name: str) -> str:
    return "gpt" if "gpt" in name else "llama"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name in CASES:
        path, flags, layout = import_foreign(os.path.join(FIXTURES, name), str(root / name))
        out[name] = (str(root / name), flags, layout)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_megatron_layout_forward(name, imported):
    save, _, layout = imported[name]
    assert layout == CASES[name]
    sd, meta, path = load_model_state(save)
    assert meta["iteration"] == gen.ITERATION and path.endswith(f"iter_{gen.ITERATION:07d}")
    model = GPTModel(checkpoint_config(sd, meta, path), device="cpu")
    model.load_state_dict(sd)
    model = model.double().eval()
    tokens = torch.randint(0, ORIGINAL_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens, torch.arange(16).expand_as(tokens))[..., :ORIGINAL_VOCAB]
    style = _style(name)
    ref = megatron_logits(gen.true_weights(style), gen.STYLES[style], tokens)[..., :ORIGINAL_VOCAB]
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-6, f"relative error {err:.1e}"  # RoPE runs in fp32; a wrong layout is O(1)


@pytest.mark.parametrize("name", ["mlm_core_llama_tp2_pp2", "mds_gpt_zero3_fp16"])
def test_adam_state_and_counters_imported(name, imported):
    import torch.distributed.checkpoint as dcp

    from megatron.checkpointing.safety import SafeFileSystemReader, SafeLoadPlanner

    save = imported[name][0]
    path = find_checkpoint(save)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    assert meta["train_state"]["consumed_train_samples"] == gen.SAMPLES
    assert meta["scheduler"]["num_steps"] == gen.SAMPLES
    assert [len(g["params"]) for g in meta["param_groups"]] != []
    style = _style(name)
    avg, _ = gen.adam_state(gen.true_weights(style))
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    want = {k: torch.empty(0) for k in ("step", "exp_avg")}
    want["exp_avg"] = torch.empty_like(
        avg["language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    )
    want["step"] = torch.tensor(0.0)
    state = {"optim_state": {key: want}}
    dcp.load(
        state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True
    )
    assert want["step"].item() == gen.ITERATION
    torch.testing.assert_close(
        want["exp_avg"], avg["language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    )


def test_load_names_foreign_layout_and_import_command():
    for name, layout in (
        ("mds_gpt_zero1_fp16", "Megatron-DeepSpeed"),
        ("mlm_legacy_gpt_tp2_fp16", "Megatron-LM legacy torch"),
        ("mlm_torch_dist_llama", "Megatron-LM torch_dist"),
    ):
        src = os.path.join(FIXTURES, name)
        with pytest.raises(UsageError) as e:
            find_checkpoint(src)
        msg = str(e.value)
        assert "\n" not in msg and f"a {layout} checkpoint" in msg
        assert f"checkpoint_convert.py import --from {src}" in msg


def test_unsafe_pickle_is_refused_by_class_name(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran",))

    it = tmp_path / "iter_0000001" / "mp_rank_00"
    it.mkdir(parents=True)
    torch.save({"model": {}, "x": Payload()}, it / "model_optim_rng.pt")
    with pytest.raises(UsageError, match=r"refused to load.*(posix|os)\.system"):
        safe_torch_load(str(it / "model_optim_rng.pt"))


def test_refused_layouts_are_one_line(tmp_path):
    src = tmp_path / "moe"
    shutil.copytree(os.path.join(FIXTURES, "mlm_legacy_gpt_tp2_fp16"), src)
    for rank in ("mp_rank_00", "mp_rank_01"):
        file = src / "iter_0000020" / rank / "model_optim_rng.pt"
        state = safe_torch_load(str(file))
        plain = {k: v for k, v in vars(state["args"]).items() if not isinstance(v, StandIn)}
        state["args"] = argparse.Namespace(**{**plain, "num_experts": 8})
        state["optimizer"] = None
        torch.save(state, str(file) + ".new")  # the loaded tensors map the old file
        os.replace(str(file) + ".new", file)
    with pytest.raises(UsageError, match="trained with --num-experts"):
        import_foreign(str(src), str(tmp_path / "out"))
    with pytest.raises(UsageError, match="not a Megatron-LM .* or Megatron-DeepSpeed"):
        import_foreign(str(tmp_path), str(tmp_path / "out"))


def test_export_matches_megatron_lm_keys_and_round_trips(imported, tmp_path):
    save = imported["mlm_legacy_gpt_tp2_fp16"][0]
    out = tmp_path / "mlm"
    export_megatron_lm(save, str(out), tp=2)
    for rank in ("mp_rank_00", "mp_rank_01"):
        rel = os.path.join("iter_0000020", rank, "model_optim_rng.pt")
        ours = safe_torch_load(str(out / rel))
        theirs = safe_torch_load(os.path.join(FIXTURES, "mlm_legacy_gpt_tp2_fp16", rel))
        assert ours["iteration"] == theirs["iteration"] and ours["checkpoint_version"] == 3.0
        from megatron.checkpointing.foreign.common import flatten

        a, b = flatten(ours["model"]), flatten(theirs["model"])
        assert list(a) == list(b)  # names, nesting and order as Megatron-LM writes them
        for key in a:
            assert a[key].shape == b[key].shape, key
            torch.testing.assert_close(a[key], b[key].float(), atol=1e-3, rtol=1e-3)  # fp16 copy
    back, _, _ = import_foreign(str(out), str(tmp_path / "back"), with_optim=False)
    sd1, _, _ = load_model_state(save)
    sd2, _, _ = load_model_state(str(tmp_path / "back"))
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


TRAIN = (
    "--micro-batch-size 1 --global-batch-size 4 --train-iters 23 --lr 3e-4 --min-lr 3e-5 "
    "--lr-decay-style cosine --lr-warmup-iters 8 --lr-decay-iters 400 --weight-decay 0.1 "
    "--adam-beta2 0.95 --log-interval 1 --eval-interval 0 --eval-iters 0 --hidden-dropout 0 "
    "--attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 50 "
    "--seed 3 --device cpu --num-workers 0 --clip-grad 1.0"
)


def test_training_continues_from_import(imported):
    runs = []
    for name, layout in (
        ("mlm_legacy_gpt_tp2_fp16", "--zero-stage 1"),
        ("mlm_core_llama_tp2_pp2", "--ds-sequence-parallel-size 2 --zero-stage 3"),
    ):
        save, flags, _ = imported[name]
        runs.append(f"{' '.join(flags)} {TRAIN} {layout} --load {save}")
    results = get_world(2).run(_train_all, runs)
    for losses in results[0]:
        assert len(losses) == 3 and all(0 < x < 10 for x in losses), losses


def _train_all(runs: list[str]) -> list[list[float]]:
    out = []
    for run in runs:
        flags = run.split(" --load ")
        out.append(run_training(f"--load {flags[1]}", base=flags[0].replace("pretrain_gpt.py", "")))
    return out


def test_pipeline_layer_files_without_zero_files(tmp_path):
    """GPTModelPipe's layer_XX files hold the (bf16) weights when no ZeRO files are there;
    ZeRO 3 without its optimizer files has no weights at all: one line."""
    src = tmp_path / "pipe"
    shutil.copytree(os.path.join(FIXTURES, "mds_llama_pipe_pp2_bf16"), src)
    for file in (src / "global_step20").glob("bf16_zero_pp_rank_*"):
        file.unlink()
    import_foreign(str(src), str(tmp_path / "out"))
    sd, meta, path = load_model_state(str(tmp_path / "out"))
    assert meta["param_groups"] is None  # weights only: the optimizer starts fresh
    ref = {k: v for k, v in gen.true_weights("llama").items()}
    torch.testing.assert_close(
        sd["transformer.layers.1.mlp.dense_4h_to_h.weight"],
        ref["language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"].bfloat16().float(),
    )
    src3 = tmp_path / "zero3"
    shutil.copytree(os.path.join(FIXTURES, "mds_gpt_zero3_fp16"), src3)
    for file in (src3 / "global_step20").glob("*optim_states.pt"):
        file.unlink()
    with pytest.raises(UsageError, match="no weights found"):
        import_foreign(str(src3), str(tmp_path / "out3"))


def test_command_line(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "checkpoint_convert_tool",
        os.path.join(os.path.dirname(HERE), "tools", "checkpoint_convert.py"),
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src = os.path.join(FIXTURES, "mds_gpt_zero1_fp16")
    assert tool.main(["import", "--from", src, "--to", str(tmp_path / "a"), "--no-optim"]) == 0
    out = capsys.readouterr().out
    assert "imported Megatron-DeepSpeed (ZeRO 1, DP 2)" in out and "--num-layers 2" in out
    assert tool.main(["import", "--from", src]) == 2
    assert "needs --to DIR" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "latest").write_text("..")
    with pytest.raises(UsageError, match="expected"):
        import_foreign(str(bad), str(tmp_path / "b"))
