"""The planner's long-context pieces: the tiled MLP, host offload and host memory in the
memory model, --find-max-seq, and the start-up host-memory line."""

from __future__ import annotations

import dataclasses

import pytest
from model_utils import tiny_config

from megatron.planning import memory_model as mm
from megatron.planning.long_context import (
    find_max_seq,
    host_memory_warning,
    recommended_tile,
)
from tools import estimate_memory

GIB = 2**30
LLAMA8B = dict(
    num_layers=4, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
    ffn_hidden_size=14336, swiglu=True, normalization="RMSNorm", add_bias_linear=False,
    position_embedding_type="rope", padded_vocab_size=128256, seq_length=131072,
    attention_backend="sdpa", loss_chunk_size=2048, recompute_granularity="full",
    hidden_dropout=0.0, attention_dropout=0.0,
)  # fmt: skip
GPU = mm.RunSetup(micro_batch_size=1, precision="bf16", device="cuda", zero_stage=1)


def test_tiled_mlp_keeps_only_the_input_and_one_tile():
    config = tiny_config(**{**LLAMA8B, "recompute_granularity": None})
    tiled = dataclasses.replace(config, tiled_mlp_chunk_size=8192)
    plain_saved = mm.layer_saved_bytes(config, GPU)
    tiled_saved = mm.layer_saved_bytes(tiled, GPU)
    assert tiled_saved["fc1_output"] == tiled_saved["fc2_input"] == 0 < plain_saved["fc1_output"]
    assert mm.layer_backward_bytes(tiled, GPU)["mlp"] < mm.layer_backward_bytes(config, GPU)["mlp"]
    assert mm.estimate_memory(tiled, GPU).total < mm.estimate_memory(config, GPU).total
    # A tile as long as the local sequence changes nothing.
    whole = dataclasses.replace(config, tiled_mlp_chunk_size=config.seq_length)
    assert mm.estimate_memory(whole, GPU).total == mm.estimate_memory(config, GPU).total


def test_offloads_move_states_to_the_host():
    config = tiny_config(**LLAMA8B)
    plain = mm.estimate_memory(config, GPU)
    opt = mm.estimate_memory(config, dataclasses.replace(GPU, optimizer_offload=True))
    params = mm.estimate_memory(config, dataclasses.replace(GPU, zero_stage=3, param_offload=True))
    assert plain.host == 0 and plain.optimizer > 0
    assert opt.optimizer == 0 and opt.params == plain.params
    assert opt.host == 16 * plain.details["params_per_gpu"] + 4 * len(mm.parameter_shapes(config))
    assert params.params == params.optimizer == 0 and params.host == opt.host
    assert params.total < opt.total < plain.total
    with pytest.raises(mm.UsageError, match="needs --zero-stage 3"):
        mm.RunSetup(param_offload=True, zero_stage=1)


def test_recommended_tile():
    config = tiny_config(**LLAMA8B)
    assert recommended_tile(config, 4096) == 0
    chunk = recommended_tile(config, 524288)  # [chunk, 2 ffn] no wider than [s, h]
    assert chunk & (chunk - 1) == 0 and chunk * 2 * 14336 <= 524288 * 4096 < 2 * chunk * 2 * 14336


def test_find_max_seq_climbs_the_ladder():
    config = tiny_config(**{**LLAMA8B, "recompute_granularity": None})
    best, tried = find_max_seq(config, GPU, 77 * GIB, 256 * GIB, 1)
    lengths = [p.seq_length for p in tried]
    assert lengths == sorted(lengths) and best.seq_length == max(lengths) > 0
    assert "--cpu-offload-params --zero-stage 3" in best.flags
    assert any(f.startswith("--tiled-mlp-chunk-size ") for f in best.flags)
    assert best.estimate.total <= 77 * GIB and best.estimate.host <= 256 * GIB
    # Less host memory: the host offloads stop paying, a shorter sequence.
    small, _ = find_max_seq(config, GPU, 77 * GIB, 8 * GIB, 1)
    assert 0 < small.seq_length < best.seq_length


def test_host_memory_warning(tmp_path):
    config = tiny_config(**{**LLAMA8B, "checkpoint_in_cpu": True})
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable: 1000 kB\n")
    line = host_memory_warning(config, GPU, 8, str(meminfo))
    assert line.startswith("WARNING: predicted host memory") and "MemAvailable" in line
    meminfo.write_text("MemAvailable: 999999999999 kB\n")
    assert host_memory_warning(config, GPU, 8, str(meminfo)) is None
    assert host_memory_warning(tiny_config(**LLAMA8B), GPU, 8, str(meminfo)) is None


def test_cli_find_max_seq(capsys):
    argv = (
        "--num-layers 4 --hidden-size 4096 --num-attention-heads 32 --group-query-attention "
        "--num-query-groups 8 --ffn-hidden-size 14336 --swiglu --normalization RMSNorm "
        "--position-embedding-type rope --disable-bias-linear --seq-length 8192 "
        "--padded-vocab-size 128256 --micro-batch-size 1 --bf16 --use-flash-attn "
        "--num-gpus 2 --host-memory-gb 256 --find-max-seq"
    ).split()
    assert estimate_memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "longest sequence:" in out and "--ds-sequence-parallel-size 2" in out
