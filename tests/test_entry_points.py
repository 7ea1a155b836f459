"""The Megatron entry points that forks of pretrain_gpt.py call stay importable."""

from __future__ import annotations

import importlib
import inspect

import pytest

ENTRY_POINTS = {
    "megatron": ["get_args"],
    "megatron.initialize": ["initialize_megatron"],
    "megatron.training": ["pretrain"],
    "megatron.checkpointing": ["load_checkpoint", "save_checkpoint"],
    "megatron.data.gpt_dataset": ["build_train_valid_test_datasets"],
    "megatron.core.parallel_state": [
        "initialize_model_parallel",
        "destroy_model_parallel",
        "get_sequence_parallel_group",
        "get_sequence_parallel_world_size",
        "get_sequence_parallel_rank",
        "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_world_size",
        "get_tensor_model_parallel_rank",
        "get_pipeline_model_parallel_group",
        "get_pipeline_model_parallel_world_size",
        "get_pipeline_model_parallel_rank",
        "get_data_parallel_group",
        "get_data_parallel_world_size",
        "get_data_parallel_rank",
    ],
}


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_entry_point_importable(module):
    mod = importlib.import_module(module)
    for name in ENTRY_POINTS[module]:
        assert callable(getattr(mod, name)), f"{module}.{name}"


def test_megatron_names_are_modules():
    """``megatron.initialize`` and ``megatron.training`` are modules (``import`` works), and
    ``megatron.core.mpu`` is Megatron's other name for ``parallel_state``."""
    from megatron.core import mpu, parallel_state

    for module in ("megatron.initialize", "megatron.training"):
        assert inspect.ismodule(importlib.import_module(module))
    assert mpu.get_sequence_parallel_group is parallel_state.get_sequence_parallel_group
