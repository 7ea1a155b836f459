"""The fields of DeepSpeed's JSON config, as DeepSpeed documents them, with their defaults.

Source: DeepSpeed's configuration reference (docs/_pages/config-json.md) and its config
classes (deepspeed/runtime/constants.py, precision_config.py, zero/config.py,
activation_checkpointing/config.py). This is data only: what a ``--deepspeed_config`` may
contain. What this project does with each field is in
:mod:`megatron.initialize.deepspeed_config`, and a test checks that every name here is
handled there.

``UNSET`` marks a field without a plain default (a block, or a value DeepSpeed derives);
any value given for it counts as set.
"""

from __future__ import annotations

UNSET = object()

# Top-level fields -> DeepSpeed's default.
TOP_LEVEL: dict[str, object] = {
    # batch size
    "train_batch_size": UNSET,
    "train_micro_batch_size_per_gpu": UNSET,
    "gradient_accumulation_steps": UNSET,
    "managed_gradient_accumulation": True,
    # optimizer and schedule
    "optimizer": UNSET,
    "scheduler": UNSET,
    "zero_allow_untested_optimizer": False,
    "zero_force_ds_cpu_optimizer": True,
    # communication
    "communication_data_type": None,
    "seq_parallel_communication_data_type": "fp32",
    "gradient_allreduce_op": "mean",
    "prescale_gradients": False,
    "gradient_predivide_factor": 1.0,
    "sparse_gradients": False,
    "disable_allgather": False,
    # precision
    "fp16": UNSET,
    "bf16": UNSET,
    "amp": UNSET,
    "torch_autocast": UNSET,
    "data_types": UNSET,
    # gradients
    "gradient_clipping": 0.0,
    # ZeRO and offload
    "zero_optimization": UNSET,
    "aio": UNSET,
    # other parallelisms and engines
    "tensor_parallel": UNSET,
    "expert_parallel": UNSET,
    "hybrid_engine": UNSET,
    "pipeline": UNSET,
    "sparse_attention": UNSET,
    # logging and monitoring
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
    "memory_breakdown": False,
    "dump_state": False,
    "log_level": UNSET,
    "flops_profiler": UNSET,
    "tensorboard": UNSET,
    "wandb": UNSET,
    "comet": UNSET,
    "csv_monitor": UNSET,
    "comms_logger": UNSET,
    # tuning, elasticity, compression, data efficiency
    "autotuning": UNSET,
    "elasticity": UNSET,
    "compression_training": UNSET,
    "data_efficiency": UNSET,
    "curriculum_learning": UNSET,
    "progressive_layer_drop": UNSET,
    "eigenvalue": UNSET,
    # activation checkpointing
    "activation_checkpointing": UNSET,
    # checkpoints and data loading
    "checkpoint": UNSET,
    "dataloader_drop_last": False,
    "use_data_before_expert_parallelism": False,
    "graph_harvesting": False,
}

# Blocks whose own fields are checked one by one -> {field: DeepSpeed's default}.
SECTIONS: dict[str, dict[str, object]] = {
    "fp16": {
        "enabled": False,
        "auto_cast": False,
        "loss_scale": 0.0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "consecutive_hysteresis": False,
        "min_loss_scale": 1,
        "fp16_master_weights_and_grads": False,
    },
    "bf16": {
        "enabled": False,
        "immediate_grad_update": False,
        "check_grad_overflow": True,
        "bf16_master_weights_and_grads": False,
        "bf16_optimizer_states": False,
    },
    "optimizer": {"type": UNSET, "params": UNSET, "legacy_fusion": False},
    "scheduler": {"type": UNSET, "params": UNSET},
    "zero_optimization": {
        "stage": 0,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 500_000_000,
        "use_multi_rank_bucket_allreduce": True,
        "allgather_partitions": True,
        "allgather_bucket_size": 500_000_000,
        "overlap_comm": UNSET,
        "load_from_fp32_weights": True,
        "elastic_checkpoint": False,
        "offload_param": None,
        "offload_optimizer": None,
        "cpu_offload": False,
        "cpu_offload_param": False,
        "cpu_offload_use_pin_memory": False,
        "zenflow": None,
        "sub_group_size": 1_000_000_000,
        "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 100_000,
        "stage3_model_persistence_threshold": UNSET,
        "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": False,
        "stage3_gather_fp16_weights_on_model_save": False,
        "stage3_module_granularity_threshold": 0,
        "stage3_use_all_reduce_for_fetch_params": False,
        "stage3_allgather_sequential": False,
        "ignore_unused_parameters": True,
        "legacy_stage1": False,
        "round_robin_gradients": False,
        "zero_hpz_partition_size": 1,
        "zero_quantized_weights": False,
        "zero_quantized_nontrainable_weights": False,
        "zero_quantized_gradients": False,
        "zeropp_loco_param": None,
        "mics_shard_size": -1,
        "mics_hierarchical_params_gather": False,
        "memory_efficient_linear": True,
        "pipeline_loading_checkpoint": False,
        "override_module_apply": True,
        "log_trace_cache_warnings": False,
        "enable_sanity_checks": False,
        "save_muon_momentum_buffer_in_memory": False,
        "leaf_module": UNSET,
        "grad_hooks": True,
    },
    "activation_checkpointing": {
        "partition_activations": False,
        "cpu_checkpointing": False,
        "contiguous_memory_optimization": False,
        "number_checkpoints": None,
        "synchronize_checkpoint_boundary": False,
        "profile": False,
    },
    "tensorboard": {"enabled": False, "output_path": "", "job_name": "DeepSpeedJobName"},
    "wandb": {"enabled": False, "group": None, "team": None, "project": "deepspeed"},
    "csv_monitor": {"enabled": False, "output_path": "", "job_name": "DeepSpeedJobName"},
    "flops_profiler": {
        "enabled": False,
        "recompute_fwd_factor": 0.0,
        "profile_step": 1,
        "module_depth": -1,
        "top_modules": 1,
        "detailed": True,
        "output_file": None,
    },
}
