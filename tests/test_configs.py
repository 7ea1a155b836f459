"""ModelConfig and ImplConfig: frozen, built from the arguments, fast paths off where
their kernels cannot run."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from model_utils import tiny_config

from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import parse_args
from megatron.model import ImplConfig, ModelConfig


def _args(extra: list[str], device: str | None = None):
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
            "--seq-length", "64", "--micro-batch-size", "1"]  # fmt: skip
    args = validate_args(parse_args(args_list=base + extra))
    args.padded_vocab_size = 128
    if device is not None:
        args.device_obj = torch.device(device)
    return args


def test_configs_are_frozen():
    config = tiny_config(recompute_granularity="full")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 32  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.impl.loss_chunk_size = 16  # type: ignore[misc]
    # Derived values are computed before the fields are set, not filled in afterwards.
    assert (config.ffn_hidden_size, config.kv_channels, config.num_key_value_heads) == (256, 8, 8)
    assert (config.impl.recompute_method, config.impl.recompute_num_layers) == ("uniform", 1)


def test_flat_names_and_replace_reach_impl():
    config = tiny_config(attention_backend="sdpa", embedding_grads_in_place=True)
    assert isinstance(config.impl, ImplConfig) and config.impl.attention_backend == "sdpa"
    other = dataclasses.replace(config, loss_chunk_size=16, hidden_size=64)
    assert other.impl == dataclasses.replace(config.impl, loss_chunk_size=16)
    assert ModelConfig(2, 64, 8, 128, 64, impl=config.impl) == dataclasses.replace(
        config, attention_dropout=0.1, hidden_dropout=0.1
    )
    with pytest.raises(TypeError, match="no_such_field"):
        tiny_config(no_such_field=1)


def test_from_args_builds_both():
    config = ModelConfig.from_args(_args(["--use-flash-attn", "--loss-chunk-size", "32"]))
    assert (config.num_layers, config.hidden_size, config.padded_vocab_size) == (2, 64, 128)
    assert config.impl == ImplConfig.from_args(
        _args(["--use-flash-attn", "--loss-chunk-size", "32"])
    )
    assert config.impl.attention_backend == "sdpa" and config.impl.loss_chunk_size == 32


def test_embedding_grads_in_place_flag():
    assert ModelConfig.from_args(_args([])).impl.embedding_grads_in_place
    off = ModelConfig.from_args(_args(["--no-embedding-grads-in-place"]))
    assert not off.impl.embedding_grads_in_place
    gaf = ModelConfig.from_args(_args(["--no-gradient-accumulation-fusion"]))
    assert gaf.impl.embedding_grads_in_place


def test_cuda_only_fast_paths_off_on_cpu_listed_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    extra = ["--fused-residual-norm", "--cross-entropy-loss-fusion"]
    with caplog.at_level(logging.INFO, logger="megatron"):
        first = ModelConfig.from_args(_args(extra, "cpu"))
        second = ModelConfig.from_args(_args(extra, "cpu"))
    assert first == second
    impl = first.impl
    assert not (impl.bias_gelu_fusion or impl.fused_residual_norm or impl.cross_entropy_fusion)
    lines = [r.getMessage() for r in caplog.records if "fast paths off" in r.getMessage()]
    assert len(lines) <= 1  # once per process, whichever test logged it first
    on_cpu = ModelConfig.from_args(_args(extra, "cpu")).impl
    assert on_cpu == impl
    # Where the kernels run (the Triton interpreter, CUDA) the switches stay as given.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kept = ModelConfig.from_args(_args(extra, "cpu")).impl
    assert kept.bias_gelu_fusion and kept.fused_residual_norm and kept.cross_entropy_fusion
    assert ModelConfig.from_args(_args(extra)).impl == kept  # no device: nothing turned off


def test_turned_off_listing_is_one_line(monkeypatch, caplog):
    from megatron.model import impl_config

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    impl_config._log_turned_off.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron"):
        for _ in range(3):
            ImplConfig(bias_gelu_fusion=True, fused_residual_norm=True).for_device(
                torch.device("cpu")
            )
    lines = [r.getMessage() for r in caplog.records if "fast paths off" in r.getMessage()]
    assert lines == [
        "> fast paths off on cpu (their Triton kernels need CUDA or TRITON_INTERPRET=1): "
        "bias-GeLU fusion --fused-residual-norm"
    ]


def test_training_and_parallel_configs_from_args():
    from megatron.core.parallel_config import ParallelConfig
    from megatron.training.config import TrainingConfig

    args = _args(
        ["--bf16", "--zero-stage", "1", "--train-samples", "7", "--lr", "1e-3",
         "--no-overlap-param-gather", "--rampup-batch-size", "1", "1", "8"],
        device="cpu",
    )  # fmt: skip
    training = TrainingConfig.from_args(args)
    assert (training.train_samples, training.global_batch_size, training.lr) == (7, 1, 1e-3)
    assert training.params_dtype == torch.bfloat16 and training.rampup_batch_size == ("1", "1", "8")
    parallel = ParallelConfig.from_args(args)
    assert (parallel.world_size, parallel.data_parallel_size, parallel.zero_stage) == (1, 1, 1)
    assert parallel.zero_param_dtype == torch.bfloat16 and parallel.distributed_backend == "gloo"
    # --no-overlap-param-gather implies no gather during the optimizer step either.
    assert not parallel.overlap_param_gather
    assert not parallel.overlap_param_gather_with_optimizer_step
    for config, name in ((training, "lr"), (parallel, "zero_stage")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, name, 0)
