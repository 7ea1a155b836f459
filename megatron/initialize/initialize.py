"""Start-up: parse and validate arguments, start torch.distributed, build the groups, seed."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.parallel_config import ParallelConfig, set_parallel_config
from megatron.core.random import set_random_seed
from megatron.errors import UsageError
from megatron.global_vars import set_args
from megatron.initialize.argument_checks import validate_args
from megatron.initialize.arguments import parse_args
from megatron.initialize.long_context_args import distributed_backend

logger = logging.getLogger("megatron")


def setup_logging(rank: int) -> None:
    """Plain Megatron-looking lines on rank 0; warnings and errors from every rank."""
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_megatron", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._megatron = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def exit_with_usage_error(err: UsageError, rank: int = 0) -> None:
    """One line, non-zero exit; printed once (rank 0) rather than by every process."""
    if rank == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def resolve_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", args.local_rank)
    return torch.device("cpu")


def _initialize_distributed(config: ParallelConfig) -> None:
    if dist.is_initialized():
        return
    backend = config.distributed_backend
    if config.device.type == "cuda":
        torch.cuda.set_device(config.device)
    timeout = timedelta(minutes=config.distributed_timeout_minutes)
    if config.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # A lone process needs no rendezvous.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    elif "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # Under torchrun, key the rendezvous by the restart attempt: a restarted worker group
        # must never read the addresses that the failed group left in the agent's store.
        store = _elastic_store(config, timeout)
        dist.init_process_group(
            backend, store=store, rank=config.rank, world_size=config.world_size, timeout=timeout
        )
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "6000")
        dist.init_process_group(
            backend, rank=config.rank, world_size=config.world_size, timeout=timeout
        )


def _elastic_store(config: ParallelConfig, timeout: timedelta) -> dist.Store:
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        config.world_size,
        is_master=not agent_hosts_store and config.rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"megatron/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def initialize_megatron(
    extra_args_provider: Callable | None = None,
    args_defaults: dict | None = None,
    args_list: Sequence[str] | None = None,
    ignore_unknown_args: bool = False,
) -> argparse.Namespace:
    """Parse, validate, initialise distributed state and seeds; return the arguments."""
    args = parse_args(extra_args_provider, ignore_unknown_args, args_list)
    setup_logging(args.rank)
    for key, value in (args_defaults or {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        if args.use_checkpoint_args:
            from megatron.checkpointing.checkpointing import load_args_from_checkpoint

            load_args_from_checkpoint(args)
        validate_args(args)
        args.device_obj = resolve_device(args)
        # with a host offload on CUDA the group serves host tensors too (cpu:gloo,cuda:nccl)
        backend = distributed_backend(args, args.device_obj.type)
        parallel = ParallelConfig.from_args(args, backend)
    except UsageError as err:
        exit_with_usage_error(err, args.rank)
    for line in args.compat_warnings:
        logger.warning("WARNING: %s", line)
    set_args(args)
    set_parallel_config(parallel)
    _initialize_distributed(parallel)
    state = parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel_size=parallel.sequence_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        device_type=parallel.device.type,
    )
    logger.info("> initialized parallel layout: %s", state.dims.describe())
    set_random_seed(args.seed)
    return args
