"""Megatron-LM checkpoints: the legacy torch format and the distributed ``torch_dist`` one.

Legacy (``--ckpt-format torch``)::

    <dir>/latest_checkpointed_iteration.txt          an iteration number or "release"
    <dir>/iter_0000100/mp_rank_00/model_optim_rng.pt  one file per tensor-parallel rank
    <dir>/iter_0000100/mp_rank_00_001/...             with pipeline parallelism: TP rank, PP rank

Each file holds ``args`` (a Namespace), ``checkpoint_version``, ``iteration``, ``model``
(nested dicts of the legacy model, or megatron-core's flat keys), ``optimizer``,
``opt_param_scheduler`` and ``rng_state``. Adam state lives in ``optimizer``: the torch
optimizer's state by parameter index, with fp16/bf16 also ``fp32_from_fp16_params`` (the fp32
master weights); the index order is the model's parameter order, split into the decayed and
the non-decayed group. The distributed optimizer (``distrib_optim.pt``) is not read.

``torch_dist``: ``iter_*/`` holds a torch.distributed.checkpoint directory (``.metadata``,
``__*_*.distcp``), ``metadata.json`` naming the backend and ``common.pt`` (args, iteration).
Transformer layers are stacked along a leading layer dimension (``decoder.layers.
self_attention.linear_qkv.weight`` is ``[num_layers, ...]``); Adam state, where saved, is
under ``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<key>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.checkpointing.foreign.common import (
    ForeignCheckpoint,
    Tensors,
    as_int,
    flatten,
)
from megatron.checkpointing.foreign.detect import (
    MLM_MODEL_FILE,
    is_torch_dist,  # noqa: F401 - re-exported for readers of this module
    mlm_iteration_dir,
    mlm_rank_dirs,
)
from megatron.checkpointing.foreign.mapping import merge_tensor_parallel, our_key, rename
from megatron.checkpointing.foreign.safe_load import namespace_dict, safe_torch_load
from megatron.checkpointing.safety import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_storage_files,
    load_failure,
)
from megatron.errors import UsageError

logger = logging.getLogger(__name__)

MODEL_FILE = MLM_MODEL_FILE
iteration_dir = mlm_iteration_dir
rank_dirs = mlm_rank_dirs


# ---- legacy ----
def _offset_layers(sd: Tensors, offset: int) -> Tensors:
    if not offset:
        return sd
    out = {}
    for key, value in sd.items():
        m = re.match(r"transformer\.layers\.(\d+)\.(.*)", key)
        out[f"transformer.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else key] = value
    return out


def _num_layers(sd: Tensors) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _param_order(model_flat: dict) -> list[str]:
    """Megatron's parameter order (named_parameters = state dict order without buffers)."""
    return [k for k, v in model_flat.items() if isinstance(v, torch.Tensor) and our_key(k)]


def _adam_by_name(optim: dict, names: list[str], shapes: dict[str, torch.Size], source: str):
    """Per-name (exp_avg, exp_avg_sq, step, master weight) from a legacy optimizer state."""
    inner = optim.get("optimizer", optim)
    if not isinstance(inner, dict) or "state" not in inner or "param_groups" not in inner:
        return None
    groups = inner["param_groups"]
    masters = optim.get("fp32_from_fp16_params")
    decay = [n for n in names if not (n.endswith(".bias") or len(shapes[n]) == 1)]
    no_decay = [n for n in names if n not in set(decay)]
    for order in ([decay, no_decay], [no_decay, decay]):
        order = [g for g in order if g]
        if len(order) != len(groups) or any(
            len(g["params"]) != len(o) for g, o in zip(groups, order)
        ):
            continue
        by_name, ok = {}, True
        for gi, (group, group_names) in enumerate(zip(groups, order)):
            for pi, (index, name) in enumerate(zip(group["params"], group_names)):
                state = inner["state"].get(index, {})
                master = masters[gi][pi] if masters else None
                avg = state.get("exp_avg")
                if avg is not None and avg.shape != shapes[name]:
                    ok = False
                step = as_int(state.get("step", group.get("step")))
                by_name[name] = (avg, state.get("exp_avg_sq"), step, master)
        if ok:
            return by_name
    raise UsageError(
        f"{source}: its optimizer's parameter groups do not match the model's parameters "
        "(another grouping, e.g. --decoupled-lr); import without the optimizer state by "
        "passing --no-optim"
    )


def read_legacy(root: str, with_optim: bool = True) -> ForeignCheckpoint:
    path = iteration_dir(root)
    ranks = rank_dirs(path)
    if not ranks:
        raise UsageError(f"{path}: no mp_rank_*/{MODEL_FILE}; not a Megatron-LM checkpoint")
    tp = max(r[0] for r in ranks) + 1
    pp = max(r[1] for r in ranks) + 1
    if len(ranks) != tp * pp:
        raise UsageError(f"{path}: {len(ranks)} mp_rank_* directories, expected TP {tp} x PP {pp}")
    layout = f"Megatron-LM legacy torch (TP {tp}, PP {pp})"
    weights_tp: list[Tensors] = [{} for _ in range(tp)]
    avg_tp: list[Tensors] = [{} for _ in range(tp)]
    sq_tp: list[Tensors] = [{} for _ in range(tp)]
    first = None
    optim_missing = not with_optim
    step = None
    offset = 0
    for p in range(pp):
        stage_layers = 0
        for t in range(tp):
            file = os.path.join(ranks[(t, p)], MODEL_FILE)
            state = safe_torch_load(file, "Megatron-LM checkpoint file")
            if not isinstance(state, dict) or "model" not in state:
                if isinstance(state, dict) and "model0" in state:
                    raise UsageError(
                        f"{file}: {layout} with virtual pipeline stages; not supported"
                    )
                raise UsageError(f"{file}: no 'model' entry; not a Megatron-LM checkpoint file")
            first = first or state
            version = state.get("checkpoint_version", 0)
            if not isinstance(version, (int, float)) or version < 2.0:
                raise UsageError(
                    f"{file}: checkpoint_version {version} (its QKV rows are in an older "
                    "order); load and save it once with Megatron-LM, then import it"
                )
            model_flat = flatten(state["model"])
            sd = _offset_layers(rename(model_flat), offset)
            stage_layers = _num_layers(sd) - offset if _num_layers(sd) else 0
            optim = state.get("optimizer")
            adam = None
            if not optim_missing and isinstance(optim, dict):
                names = _param_order(model_flat)
                shapes = {n: model_flat[n].shape for n in names}
                adam = _adam_by_name(optim, names, shapes, file)
            if adam is None:
                optim_missing = True
            else:
                for name, (avg, sq, s, master) in adam.items():
                    ours = _offset_layers({our_key(name): None}, offset)
                    key = next(iter(ours))
                    if master is not None:
                        sd[key] = master
                    if avg is None or sq is None:
                        optim_missing = True
                        continue
                    avg_tp[t][key], sq_tp[t][key] = avg, sq
                    step = step if step is not None else s
            weights_tp[t].update(sd)
        offset += stage_layers
    args = namespace_dict(first.get("args"))
    swiglu = bool(args.get("swiglu"))
    weights = merge_tensor_parallel(weights_tp, swiglu)
    exp_avg = exp_avg_sq = None
    if optim_missing:
        if with_optim:
            logger.warning(
                "WARNING: %s holds no Adam state this import can read (distributed optimizer, "
                "or none saved): the optimizer starts fresh",
                path,
            )
    else:
        exp_avg = merge_tensor_parallel(avg_tp, swiglu)
        exp_avg_sq = merge_tensor_parallel(sq_tp, swiglu)
    sched = first.get("opt_param_scheduler") or first.get("lr_scheduler")
    return _checkpoint(layout, path, args, first.get("iteration"), sched, weights,
                       exp_avg, exp_avg_sq, step, tp)  # fmt: skip


def _checkpoint(layout, path, args, iteration, sched, weights, exp_avg, exp_avg_sq, step, tp):
    """The :class:`ForeignCheckpoint` of either Megatron-LM format (fused QKV interleaved per
    query group; the vocabulary padded to a multiple of its divisor x TP)."""
    return ForeignCheckpoint(
        layout=layout,
        directory=path,
        args=args,
        iteration=as_int(iteration) or 0,
        weights=weights,
        qkv_interleaved=True,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        step=step,
        scheduler_steps=as_int(sched.get("num_steps")) if isinstance(sched, dict) else None,
        vocab_divisor=(args.get("make_vocab_size_divisible_by") or 128) * tp,
    )


# ---- torch_dist ----
def _unstack_layers(key: str, value: torch.Tensor, num_layers: int) -> dict[str, torch.Tensor]:
    """``decoder.layers.X`` stacked ``[L, ...]`` -> ``decoder.layers.N.X``."""
    if key.startswith("decoder.layers.") and not re.match(r"decoder\.layers\.\d+\.", key):
        if value.shape[0] != num_layers:
            raise UsageError(
                f"torch_dist key {key}: leading dimension {value.shape[0]} is not the layer count"
            )
        rest = key[len("decoder.layers.") :]
        return {f"decoder.layers.{i}.{rest}": value[i] for i in range(num_layers)}
    return {key: value}


def read_torch_dist(root: str, with_optim: bool = True) -> ForeignCheckpoint:
    path = iteration_dir(root)
    layout = "Megatron-LM torch_dist"
    meta_json = os.path.join(path, "metadata.json")
    if os.path.isfile(meta_json):
        try:
            with open(meta_json, "rb") as f:
                backend = json.loads(f.read().decode("utf-8")).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"{meta_json}: not a JSON object ({type(e).__name__})") from None
        if backend != "torch_dist":
            raise UsageError(
                f"{path}: Megatron-LM {backend} checkpoint; only torch_dist is imported"
            )
    common = safe_torch_load(os.path.join(path, "common.pt"), "Megatron-LM common.pt")
    args = namespace_dict(common.get("args"))
    num_layers = args.get("num_layers")
    reader = SafeFileSystemReader(path)
    check_storage_files(reader, path)
    metadata = reader.read_metadata()
    wanted: Tensors = {}
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue  # pickled objects (_extra_state, RNG): never unpickled
        model_key = key
        for prefix in (
            "optimizer.state.exp_avg.",
            "optimizer.state.exp_avg_sq.",
            "optimizer.state.fp32_param.",
        ):
            if key.startswith(prefix):
                model_key = key[len(prefix) :]
                if not with_optim and "fp32_param" not in prefix:
                    model_key = None
        if model_key is None or (model_key.startswith("optimizer.") or "_extra_state" in model_key):
            continue
        if model_key.startswith("rerun_state") or model_key.startswith("rng_state"):
            continue
        our_key(
            re.sub(r"^decoder\.layers\.(?!\d)", "decoder.layers.0.", model_key)
        )  # unknown: refuse
        wanted[key] = torch.empty(item.size, dtype=item.properties.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except UsageError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps errors
        raise load_failure(e, path) from None
    parts: dict[str, Tensors] = {"": {}, "exp_avg": {}, "exp_avg_sq": {}, "fp32_param": {}}
    for key, value in wanted.items():
        kind = ""
        for name in ("exp_avg_sq", "exp_avg", "fp32_param"):
            if key.startswith(f"optimizer.state.{name}."):
                kind, key = name, key[len(f"optimizer.state.{name}.") :]
                break
        for k, v in _unstack_layers(key, value, num_layers).items():
            parts[kind][k] = v
    weights = rename(parts[""])
    weights.update(rename(parts["fp32_param"]))
    exp_avg = rename(parts["exp_avg"]) or None
    exp_avg_sq = rename(parts["exp_avg_sq"]) or None
    if with_optim and (exp_avg is None or set(exp_avg) != set(weights)):
        logger.warning("WARNING: %s holds no complete Adam state: the optimizer starts fresh", path)
        exp_avg = exp_avg_sq = None
    step = None
    optim_common = common.get("optimizer")
    if isinstance(optim_common, dict):
        groups = (optim_common.get("optimizer") or optim_common).get("param_groups") or []
        if groups and isinstance(groups[0], dict):
            step = as_int(groups[0].get("step"))
    tp = args.get("tensor_model_parallel_size") or 1
    sched = common.get("opt_param_scheduler")
    return _checkpoint(layout, path, args, common.get("iteration"), sched, weights,
                       exp_avg, exp_avg_sq, step, tp)  # fmt: skip
