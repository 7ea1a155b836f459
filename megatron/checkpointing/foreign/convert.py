"""Import a Megatron-LM / Megatron-DeepSpeed checkpoint as ours; export ours to Megatron-LM.

The import writes a normal checkpoint of this project (``iter_N/`` with DCP tensors and
``meta.json``) at the source's iteration: the weights (fp32 master weights where the source
kept them), and, where the source holds Adam state, the optimizer state and the scheduler
position, so ``--load`` continues training at any SP/DP/ZeRO layout.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatron.checkpointing.checkpointing import (
    FORMAT_VERSION,
    ONE_PROCESS_LAYOUT,
    TRACKER,
    checkpoint_dir,
    is_complete,
    publish_checkpoint,
)
from megatron.checkpointing.checks import probe_writable, save_failure
from megatron.checkpointing.foreign.common import ForeignCheckpoint, Tensors
from megatron.checkpointing.foreign.deepspeed import read_deepspeed
from megatron.checkpointing.foreign.detect import foreign_layout
from megatron.checkpointing.foreign.mapping import (
    config_from_megatron_args,
    qkv_to_interleaved,
    split_tensor_parallel,
    to_megatron_legacy,
    to_ours,
)
from megatron.checkpointing.foreign.megatron_lm import read_legacy, read_torch_dist
from megatron.checkpointing.hf_conversion import args_from_config, key_mismatch, model_flags
from megatron.errors import UsageError
from megatron.model.config import ModelConfig
from megatron.optimizer.adamw import ADAMW_GROUP_FLAGS

logger = logging.getLogger(__name__)

_READERS = {
    "Megatron-DeepSpeed": read_deepspeed,
    "Megatron-LM legacy torch": read_legacy,
    "Megatron-LM torch_dist": read_torch_dist,
}


def read_foreign(src: str, with_optim: bool = True) -> ForeignCheckpoint:
    layout = foreign_layout(src)
    if layout is None:
        raise UsageError(
            f"--from {src}: not a Megatron-LM (iter_*/mp_rank_*/model_optim_rng.pt, or a "
            "torch_dist iter_* with common.pt) or Megatron-DeepSpeed (latest, global_step*/) "
            "checkpoint directory"
        )
    return _READERS[layout](src, with_optim)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


def _ours(sd: Tensors, config: ModelConfig, interleaved: bool) -> Tensors:
    out = to_ours(sd, config, interleaved)
    for key in ("embedding.word_embeddings.weight", "output_layer"):
        if key in out:
            out[key] = _pad_rows(out[key], config.padded_vocab_size)
    return out


def foreign_to_ours(
    ckpt: ForeignCheckpoint, qkv_layout: str = "auto", seq_length: int | None = None
) -> tuple[Tensors, Tensors | None, Tensors | None, ModelConfig]:
    """(weights, exp_avg, exp_avg_sq, config) in our layout; shapes checked against the model."""
    interleaved = {"auto": ckpt.qkv_interleaved, "interleaved": True, "contiguous": False}[
        qkv_layout
    ]
    emb = ckpt.weights.get("embedding.word_embeddings.weight")
    if emb is None:
        raise UsageError(f"{ckpt.directory}: no word embeddings found; not a GPT checkpoint")
    rows = math.ceil(emb.shape[0] / ckpt.vocab_divisor) * ckpt.vocab_divisor
    config = config_from_megatron_args(ckpt.args, rows, ckpt.directory, seq_length)
    sd = _ours(ckpt.weights, config, interleaved)
    if mismatch := key_mismatch(sd, config):
        raise UsageError(
            f"{ckpt.directory}: its tensors do not match its args ({mismatch}); a model "
            "variant this converter does not know"
        )
    from megatron.model import GPTModel

    shapes = {k: tuple(v.shape) for k, v in GPTModel(config, device="meta").state_dict().items()}
    for key, value in sd.items():
        if tuple(value.shape) != shapes[key]:
            raise UsageError(
                f"{ckpt.directory}: {key} has shape {tuple(value.shape)}, but its args imply "
                f"{shapes[key]}"
            )
    avg = sq = None
    if ckpt.exp_avg is not None and ckpt.exp_avg_sq is not None:
        avg = _ours(ckpt.exp_avg, config, interleaved)
        sq = _ours(ckpt.exp_avg_sq, config, interleaved)
        if set(avg) != set(sd) or set(sq) != set(sd):
            logger.warning("WARNING: Adam state does not cover every parameter; not imported")
            avg = sq = None
    return sd, avg, sq, config


def _param_groups(config: ModelConfig, args: dict[str, Any]) -> list[dict[str, Any]]:
    """meta.json ``param_groups`` as our optimizer writes them (FQNs; AdamW's fields)."""
    from megatron.model import GPTModel

    decay, no_decay = [], []
    for name, p in GPTModel(config, device="meta").named_parameters():
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(name)
    common = {
        "lr_mult": 1.0,
        "lr": args.get("lr") or 0.0,
        "betas": [args.get("adam_beta1", 0.9), args.get("adam_beta2", 0.999)],
        "eps": args.get("adam_eps", 1e-8),
        "weight_decay": args.get("weight_decay", 0.01),
        **ADAMW_GROUP_FLAGS,
    }
    return [
        {"wd_mult": 1.0, **common, "params": decay},
        {"wd_mult": 0.0, **common, "params": no_decay},
    ][: 2 if no_decay else 1]


def import_foreign(
    src: str,
    save: str,
    with_optim: bool = True,
    qkv_layout: str = "auto",
    seq_length: int | None = None,
) -> tuple[str, list[str], str]:
    """Import ``src`` into ``save``; returns (checkpoint directory, model flags, layout)."""
    ckpt = read_foreign(src, with_optim)
    sd, avg, sq, config = foreign_to_ours(ckpt, qkv_layout, seq_length)
    it = ckpt.iteration
    if os.path.isfile(os.path.join(save, TRACKER)) or is_complete(checkpoint_dir(save, it)):
        raise UsageError(f"--to {save} already holds a checkpoint; choose an empty directory")
    probe_writable(save, 0)
    args = ckpt.args
    extra = {
        "make_vocab_size_divisible_by": ckpt.vocab_divisor,
        "imported_from": os.path.abspath(src),
        "imported_layout": ckpt.layout,
    }
    our_args = args_from_config(config, **extra)
    tensors: dict[str, Any] = {"model": sd}
    param_groups = None
    if avg is not None:
        step = torch.tensor(float(ckpt.step if ckpt.step is not None else it))
        tensors["optim_state"] = {
            k: {"step": step.clone(), "exp_avg": avg[k], "exp_avg_sq": sq[k]} for k in sd
        }
        param_groups = _param_groups(config, args)
    samples = args.get("consumed_train_samples") or 0
    meta = {
        "format_version": FORMAT_VERSION,
        "iteration": it,
        "train_state": {
            "iteration": it,
            "consumed_train_samples": samples,
            "consumed_valid_samples": args.get("consumed_valid_samples") or 0,
        },
        "scheduler": {"num_steps": ckpt.scheduler_steps or samples},
        "grad_scaler": {},
        "param_groups": param_groups,
        "layout": dict(ONE_PROCESS_LAYOUT),
        "args": our_args,
    }
    tmp = checkpoint_dir(save, it) + ".inprogress"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(tensors, checkpoint_id=tmp, no_dist=True)
        path = publish_checkpoint(save, tmp, meta)
    except (OSError, CheckpointException) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = save_failure(e, save, it)
        if error is None:
            raise
        raise error from None
    flags = model_flags(our_args) + [f"--seq-length {config.seq_length}"]
    return path, flags, ckpt.layout


# ---- export ----
# Our meta.json ``args`` names -> Megatron-LM's, where they differ.
_MEGATRON_NAMES = {
    "num_key_value_heads": "num_query_groups",
    "rotary_position_embeddings_theta": "rotary_base",
    "layernorm_epsilon": "norm_epsilon",
}


def megatron_args(config: ModelConfig, meta: dict, tp: int) -> argparse.Namespace:
    """Megatron-LM's ``args`` for a legacy checkpoint of ``config`` (its flag names)."""
    ours = args_from_config(config)
    del ours["use_rotary_position_embeddings"]  # Megatron-DeepSpeed's; position_embedding_type
    args = {_MEGATRON_NAMES.get(k, k): v for k, v in ours.items()}
    args["rotary_base"] = int(args["rotary_base"])
    saved = meta.get("args", {})
    return argparse.Namespace(
        **args,
        group_query_attention=config.num_key_value_heads != config.num_attention_heads,
        add_qkv_bias=config.add_bias_linear,
        make_vocab_size_divisible_by=max(
            1, (saved.get("make_vocab_size_divisible_by") or 128) // tp
        ),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        params_dtype=torch.float32,
        fp16=False,
        bf16=False,
        iteration=meta["iteration"],
        consumed_train_samples=meta["train_state"].get("consumed_train_samples", 0),
        consumed_valid_samples=meta["train_state"].get("consumed_valid_samples", 0),
        ckpt_format="torch",
    )


def _nest(flat: Tensors) -> dict:
    """``language_model.embedding.word_embeddings.weight`` -> Megatron's nested dicts (the
    encoder's keys stay flat, as its state_dict_for_save_checkpoint writes them)."""
    lm: dict = {}
    for key, value in flat.items():
        rest = key[len("language_model.") :]
        if rest.startswith("embedding."):
            _, module, param = rest.split(".")
            lm.setdefault("embedding", {}).setdefault(module, {})[param] = value
        elif rest.startswith("encoder."):
            lm.setdefault("encoder", {})[rest[len("encoder.") :]] = value
        else:
            module, param = rest.split(".")
            lm.setdefault(module, {})[param] = value
    return {"language_model": lm}


def export_megatron_lm(
    load: str, output: str, tp: int = 1, iteration: int | None = None
) -> list[str]:
    """Write checkpoint ``load`` as Megatron-LM's legacy torch layout (weights, args, iteration)."""
    from megatron.checkpointing.hf_conversion_io import checkpoint_config, load_model_state

    if tp < 1:
        raise UsageError(f"--tensor-model-parallel-size {tp} must be >= 1")
    if os.path.exists(os.path.join(output, TRACKER)):
        raise UsageError(f"--output {output} already holds a checkpoint; choose a new directory")
    sd, meta, path = load_model_state(load, iteration)
    config = checkpoint_config(sd, meta, path)
    if (
        config.padded_vocab_size % tp
        or config.num_key_value_heads % tp
        or config.ffn_hidden_size % tp
    ):
        raise UsageError(
            f"--tensor-model-parallel-size {tp} does not divide the vocabulary rows, K/V heads "
            "and FFN size"
        )
    it = meta["iteration"]
    heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    interleaved = {
        k: qkv_to_interleaved(v, *heads) if "query_key_value" in k else v for k, v in sd.items()
    }
    shards = split_tensor_parallel(interleaved, tp, config.swiglu)
    args = megatron_args(config, meta, tp)
    files = []
    for rank, shard in enumerate(shards):
        state = {
            "args": args,
            "checkpoint_version": 3.0,
            "iteration": it,
            "model": _nest(to_megatron_legacy(shard)),
            "num_floating_point_operations_so_far": 0,
        }
        rel = os.path.join(f"iter_{it:07d}", f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(os.path.join(output, rel)), exist_ok=True)
        torch.save(state, os.path.join(output, rel))
        files.append(rel)
    with open(os.path.join(output, TRACKER), "w") as f:
        f.write(str(it))
    return files + [TRACKER]
