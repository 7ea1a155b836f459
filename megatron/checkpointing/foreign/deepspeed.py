"""Megatron-DeepSpeed checkpoints, written by the DeepSpeed engine.

::

    <dir>/latest                                   the tag, e.g. "global_step100"
    <dir>/global_step100/mp_rank_00_model_states.pt  module (nested legacy state dict, or None
                                                   with pipeline layers), param_shapes, and
                                                   Megatron's client state (args, iteration)
    <dir>/global_step100/layer_01-model_00-model_states.pt   GPTModelPipe: one file per layer
    <dir>/global_step100/zero_pp_rank_0_mp_rank_00_optim_states.pt   ZeRO 1/2/3, one per DP rank
    <dir>/global_step100/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt  bf16 (BF16_Optimizer)
    <dir>/global_step100/zero_pp_rank_0_mp_rank_00_model_states.pt   ZeRO 3 (no weights in it)
    <dir>/global_step100_universal/zero/<param name>/{fp32,exp_avg,exp_avg_sq,step}.pt

``mp_rank_XX`` counts tensor-parallel ranks (merged like Megatron-LM's), or, with
GPTModelPipe over pipeline stages, the stages (their parameters are disjoint and keep the
global layer index in their names); both at once is refused. The optimizer files hold, per
parameter group, each DP rank's slice of one flat fp32 vector
(``single_partition_of_fp32_groups``; ZeRO 3: ``fp32_flat_groups``) and Adam's moments in
the same layout. ZeRO 1/2 concatenate the ranks' slices and read the parameters of
``param_shapes`` one after another; ZeRO 3 splits every parameter into ``ceil(numel / ranks)``
pieces, one per rank. Names in ``param_shapes`` are the engine module's (``language_model.
encoder.layers.N...``, or GPTModelPipe's ``<layer index>.<name>``).

The fused QKV layout changed in Megatron-DeepSpeed 2024-12 (commit 676a482c, "FPDT"): before,
Megatron's per-group interleave; since, ``[q | k | v]``. Checkpoints written since carry the
``ds_sequence_parallel_fpdt`` argument added by that commit, which decides it here.
"""

from __future__ import annotations

import logging
import math
import os
import re

import torch

from megatron.checkpointing.foreign.common import (
    ForeignCheckpoint,
    Tensors,
    as_int,
    flatten,
    pipe_names,
)
from megatron.checkpointing.foreign.detect import DS_MODEL_FILE, ds_tag_dir
from megatron.checkpointing.foreign.mapping import merge_tensor_parallel, rename
from megatron.checkpointing.foreign.safe_load import StandIn, namespace_dict, safe_torch_load
from megatron.errors import UsageError

logger = logging.getLogger(__name__)

OPTIM_FILE = re.compile(r"(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
MODEL_FILE = DS_MODEL_FILE
ZERO3_MODEL_FILE = re.compile(r"zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt")
tag_dir = ds_tag_dir


def _model_states(path: str) -> list[dict]:
    """Each tensor-parallel rank's model states (``mp_rank_XX``; ZeRO 3: DP rank 0's file)."""
    names = os.listdir(path)
    found = {int(m.group(1)): n for n in names if (m := MODEL_FILE.fullmatch(n))}
    found = found or {int(m.group(1)): n for n in names if (m := ZERO3_MODEL_FILE.fullmatch(n))}
    if not found:
        raise UsageError(f"{path}: no mp_rank_00_model_states.pt; not a DeepSpeed checkpoint")
    if sorted(found) != list(range(len(found))):
        raise UsageError(
            f"{path}: model states of tensor-parallel ranks {sorted(found)}; some are missing"
        )
    states = []
    for rank in range(len(found)):
        file = os.path.join(path, found[rank])
        state = safe_torch_load(file, "DeepSpeed model states file")
        if not isinstance(state, dict):
            raise UsageError(f"{file}: not a DeepSpeed model states dict")
        states.append(state)
    return states


def _module_weights(path: str, state: dict, tp_rank: int) -> dict[str, torch.Tensor]:
    """Weights from ``module`` (legacy names) or the layer files (pipeline names)."""
    if state.get("module"):
        return flatten(state["module"])
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        m = LAYER_FILE.fullmatch(name)
        if not m or int(m.group(2)) != tp_rank:
            continue
        layer = safe_torch_load(os.path.join(path, name), "DeepSpeed layer file")
        for key, value in flatten(layer).items():
            out.setdefault(f"{int(m.group(1))}.{key}", value)  # a tied layer's copy: first wins
    return out


def _stage(osd: dict, bf16: bool) -> int:
    stage = osd.get("zero_stage")
    if isinstance(stage, StandIn):
        stage = stage.value
    if stage is None and bf16:
        return 1  # BF16_Optimizer: ZeRO 1 without the key
    if stage not in (1, 2, 3):
        raise UsageError(f"DeepSpeed optimizer state with zero_stage {stage!r}; not supported")
    return int(stage)


def _group_states(osd: dict, stage: int) -> list[dict]:
    """Per parameter group, the Adam state of this rank's flat slice."""
    base = osd.get("optimizer_state_dict") if stage == 3 else osd.get("base_optimizer_state")
    if isinstance(base, list):
        return base
    if isinstance(base, dict) and isinstance(base.get("state"), dict):
        return [base["state"][k] for k in sorted(base["state"])]
    return []


def _split_zero12(flat_by_rank: list[list[torch.Tensor]], shapes: list[dict]) -> Tensors:
    out: Tensors = {}
    for g, group_shapes in enumerate(shapes):
        full = torch.cat([ranks[g].reshape(-1) for ranks in flat_by_rank])
        offset = 0
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            if offset + n > full.numel():
                raise UsageError(
                    f"ZeRO partitions hold {full.numel()} values, fewer than group {g}'s parameters"
                )
            out[name] = full[offset : offset + n].view(tuple(shape))
            offset += n
    return out


def _split_zero3(flat_by_rank: list[list[torch.Tensor]], shapes: list[dict]) -> Tensors:
    ranks = len(flat_by_rank)
    flats = [torch.cat([t.reshape(-1) for t in groups]) for groups in flat_by_rank]
    out: Tensors = {}
    offset = 0
    for group_shapes in shapes:
        for name, shape in group_shapes.items():
            n = math.prod(shape)
            part = math.ceil(n / ranks)
            pieces = [flat[offset : offset + part] for flat in flats]
            out[name] = torch.cat(pieces)[:n].view(tuple(shape))
            offset += part
    if offset != flats[0].numel():
        raise UsageError(
            f"ZeRO 3 partitions hold {flats[0].numel()} values per rank, the parameters {offset}"
        )
    return out


def _read_zero(path: str, state: dict, files: list[str], with_optim: bool):
    bf16 = files[0].startswith("bf16_")
    osds = []
    for name in files:
        loaded = safe_torch_load(os.path.join(path, name), "DeepSpeed optimizer file")
        osds.append(loaded.get("optimizer_state_dict") if isinstance(loaded, dict) else None)
        if not isinstance(osds[-1], dict):
            raise UsageError(
                f"{os.path.join(path, name)}: no optimizer_state_dict; not a ZeRO file"
            )
    stage = _stage(osds[0], bf16)
    count = osds[0].get("partition_count")
    count = max(count) if isinstance(count, (list, tuple)) else count
    if count != len(files):
        raise UsageError(
            f"{path}: {len(files)} ZeRO optimizer files, but partition_count is {count}"
        )
    shapes = state.get("param_shapes")
    if not isinstance(shapes, list):
        raise UsageError(f"{path}: the model states file has no param_shapes")
    split = _split_zero3 if stage == 3 else _split_zero12
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    weights = split([osd[key] for osd in osds], shapes)
    avg = sq = step = None
    states = [_group_states(osd, stage) for osd in osds]
    if with_optim and all(len(s) == len(shapes) and "exp_avg" in s[0] for s in states):
        avg = split([[g["exp_avg"] for g in s] for s in states], shapes)
        sq = split([[g["exp_avg_sq"] for g in s] for s in states], shapes)
        step = as_int(states[0][0].get("step"))
    elif with_optim:
        logger.warning(
            "WARNING: %s: no Adam state found in the ZeRO files; the optimizer starts fresh", path
        )
    label = f"ZeRO {stage}{' bf16' if bf16 else ''}, DP {len(files)}"
    return weights, avg, sq, step, label


def _read_universal(path: str, with_optim: bool):
    zero = os.path.join(path, "zero")
    weights: Tensors = {}
    avg: Tensors = {}
    sq: Tensors = {}
    step = None
    for name in sorted(os.listdir(zero)):
        folder = os.path.join(zero, name)
        if not os.path.isdir(folder):
            continue
        for kind, into in (("fp32", weights), ("exp_avg", avg), ("exp_avg_sq", sq)):
            file = os.path.join(folder, f"{kind}.pt")
            if kind != "fp32" and not with_optim:
                continue
            if os.path.isfile(file):
                obj = safe_torch_load(file, "universal checkpoint file")
                into[name] = obj["param"] if isinstance(obj, dict) else obj
        step_file = os.path.join(folder, "step.pt")
        if step is None and with_optim and os.path.isfile(step_file):
            obj = safe_torch_load(step_file, "universal checkpoint file")
            step = as_int(obj["param"] if isinstance(obj, dict) else obj)
    complete = with_optim and set(avg) == set(weights) == set(sq)
    if with_optim and not complete:
        logger.warning("WARNING: %s: Adam state incomplete; the optimizer starts fresh", path)
    return weights, avg if complete else None, sq if complete else None, step


def _legacy_names(sd: Tensors | None) -> Tensors | None:
    if sd is None:
        return None
    mapping = pipe_names(list(sd))
    return rename({mapping[k]: v for k, v in sd.items()})


def _read_rank(path, state, names, mp_rank, layer_rank, universal, with_optim):
    """One model-parallel rank's (weights, exp_avg, exp_avg_sq, step, label), its own names."""
    files = [n for n in names if (m := OPTIM_FILE.fullmatch(n)) and int(m.group(3)) == mp_rank]
    files.sort(key=lambda n: int(OPTIM_FILE.fullmatch(n).group(2)))
    avg = sq = step = None
    if universal:
        raw, avg, sq, step = _read_universal(path, with_optim)
        label = "universal"
    elif files:
        raw, avg, sq, step, label = _read_zero(path, state, files, with_optim)
    else:
        raw = _module_weights(path, state, layer_rank)
        label = "model states only"
        if with_optim and mp_rank == 0:
            logger.warning("WARNING: %s: no ZeRO optimizer files; the optimizer starts fresh", path)
    if not any(isinstance(t, torch.Tensor) and t.numel() for t in raw.values()):
        raise UsageError(
            f"{path}: no weights found (ZeRO 3 keeps them only in its "
            "zero_pp_rank_*_optim_states.pt files, which are missing); restore them"
        )
    return raw, avg, sq, step, label


def read_deepspeed(root: str, with_optim: bool = True) -> ForeignCheckpoint:
    path = tag_dir(root)
    if not os.path.isdir(path):
        raise UsageError(f"{path}: the DeepSpeed tag directory named by 'latest' is missing")
    names = os.listdir(path)
    states = _model_states(path)
    args = namespace_dict(states[0].get("args"))
    zero = os.path.join(path, "zero")
    universal = os.path.isdir(zero) and any(
        os.path.isfile(os.path.join(zero, n, "fp32.pt")) for n in os.listdir(zero)
    )
    if universal:
        states = states[:1]  # universal parameters are whole
    pp = args.get("pipeline_model_parallel_size") or 1
    ranks = [  # layer files are named by TP rank; with pipeline stages every stage's are 00
        _read_rank(path, st, names, t, t if pp == 1 else 0, universal, with_optim)
        for t, st in enumerate(states)
    ]
    tp = len(ranks)
    interleaved = "ds_sequence_parallel_fpdt" not in args
    swiglu = bool(args.get("swiglu"))
    qkv_split = None
    if pp > 1 and not universal:  # DeepSpeed's mp_rank counts pipeline stages x TP ranks
        if tp != pp:
            raise UsageError(
                f"{path}: Megatron-DeepSpeed with pipeline ({pp} stages) and tensor parallelism "
                "at once; not supported: convert it to a universal checkpoint first"
            )
        tp = 1
    elif not interleaved and tp > 1:
        heads = args.get("num_attention_heads") or 1
        kv_heads = args.get("num_key_value_heads") or heads
        d = args.get("kv_channels") or (args.get("hidden_size") or 0) // heads
        qkv_split = [heads // tp * d, kv_heads // tp * d, kv_heads // tp * d]

    def merged(i: int) -> Tensors | None:
        parts = [r[i] for r in ranks]
        if any(p is None for p in parts):
            return None
        if pp > 1 and not universal:  # stages hold disjoint parameters, pipeline-named
            union: Tensors = {}
            for part in parts:
                union.update(part)
            return _legacy_names(union)
        return merge_tensor_parallel([_legacy_names(p) for p in parts], swiglu, qkv_split)

    sched = states[0].get("lr_scheduler") or {}
    label = ranks[0][4] + (f", TP {tp}" if tp > 1 else "") + (f", PP {pp}" if pp > 1 else "")
    return ForeignCheckpoint(
        layout=f"Megatron-DeepSpeed ({label})",
        directory=path,
        args=args,
        iteration=as_int(states[0].get("iteration")) or as_int(states[0].get("global_steps")) or 0,
        weights=merged(0),
        qkv_interleaved=interleaved,
        exp_avg=merged(1),
        exp_avg_sq=merged(2),
        step=ranks[0][3],
        scheduler_steps=as_int(sched.get("num_steps")) if isinstance(sched, dict) else None,
        vocab_divisor=(args.get("make_vocab_size_divisible_by") or 128)
        * (args.get("tensor_model_parallel_size") or 1),
    )
