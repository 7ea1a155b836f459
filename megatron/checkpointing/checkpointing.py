"""Checkpoints: torch.distributed.checkpoint for tensors, JSON for everything else.

Layout (Megatron's tracker and directory names)::

    <save>/latest_checkpointed_iteration.txt
    <save>/iter_0000100/.metadata, __*_*.distcp   tensors: model and optimizer state (DCP)
    <save>/iter_0000100/meta.json                 counters, args, scheduler, scaler, param groups
    <save>/iter_0000100/rng/rank_00000.json       RNG states of every rank
    <save>/iter_0000100/tokenizer/                copies of the tokenizer files

A checkpoint is written to ``iter_XXXXXXX.inprogress``; only after every rank finished and
the files are synced does rank 0 write ``meta.json``, rename the directory and move the
tracker (atomically). A complete checkpoint is never replaced. Loading never unpickles
arbitrary objects: the DCP metadata goes through an allow-listed unpickler, non-tensor items
are refused, and no file outside the checkpoint directory is read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from megatron.checkpointing.checks import (
    apply_json_state,
    directory_iteration,
    parse_meta,
    probe_writable,
    read_tracker,
    save_failure,
)
from megatron.checkpointing.foreign.detect import load_hint
from megatron.checkpointing.hf_conversion import MODEL_SHAPE_ARG_KEYS
from megatron.checkpointing.safety import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_storage_files,
    load_failure,
)
from megatron.core.parallel_state import ParallelState
from megatron.core.random import dropout_seed_offset, set_random_seed
from megatron.errors import UsageError
from megatron.tokenizer.files import (
    FILE_ARGS,
    checkpoint_tokenizer_args,
    copy_tokenizer_files,
    use_checkpoint_tokenizer,
)

logger = logging.getLogger("megatron")

TRACKER = "latest_checkpointed_iteration.txt"
META = "meta.json"
# 2: the layout records the ring degree ("cp"); version 1 layouts (no "cp") read as cp 1.
FORMAT_VERSION = 2
# The layout of a checkpoint written by one process (imports and conversions).
ONE_PROCESS_LAYOUT = {"world_size": 1, "sp": 1, "cp": 1, "dp": 1}


def layout_of(state: ParallelState) -> dict[str, int]:
    """The checkpoint's ``layout``: world size, Ulysses (sp), ring (cp) and data degrees."""
    dims = state.dims
    return {"world_size": dims.world_size, "sp": dims.sp, "cp": dims.cp, "dp": dims.dp}


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META)) and os.path.isfile(
        os.path.join(path, ".metadata")
    )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _agree(error: UsageError | None) -> None:
    """A barrier that raises on every rank when any rank failed (with that rank's line)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        first = next((m for m in messages if m is not None), None)
        if first is not None:
            raise UsageError(first)
    elif error is not None:
        raise error


# ---- RNG states as JSON (no pickle) ----
def rng_state_to_json() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def rng_state_from_json(state: dict) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable_args(args: argparse.Namespace) -> dict:
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (str, int, float, bool)) for v in value
        ):
            out[key] = list(value)
        elif isinstance(value, torch.dtype):
            out[key] = str(value).replace("torch.", "")
    return out


def _tensor_state(model, optimizer, with_optim: bool) -> tuple[dict, list | None]:
    """DCP's view of the tensors to save or load; ``optimizer`` None means weights only."""
    if optimizer is None:
        return {"model": get_model_state_dict(model)}, None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors = {"model": model_sd}
    if with_optim:
        tensors["optim_state"] = optim_sd["state"]
    return tensors, optim_sd["param_groups"]


def publish_checkpoint(root: str, tmp: str, meta: dict) -> str:
    """Make a fully written ``<iter>.inprogress`` directory the latest checkpoint (one process).

    meta.json is written last inside the directory, the directory is renamed into place
    (an incomplete leftover of the same iteration is removed only after that), then the
    tracker moves. A complete checkpoint of the same iteration is never replaced.
    """
    iteration = meta["iteration"]
    final = checkpoint_dir(root, iteration)
    if is_complete(final):
        raise UsageError(
            f"{final}: a complete checkpoint is already there; it is never overwritten"
        )
    _write_json_atomic(os.path.join(tmp, META), meta)
    _fsync_dir(tmp)
    if os.path.exists(final):
        old = final + ".old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)
    return final


def save_checkpoint(args, state: ParallelState, model, optimizer, scheduler, scaler, ts) -> str:
    """Save iteration ``ts.iteration``; the tracker moves only once the save is complete.

    A file-system failure (disk full, quota, read-only) on any rank is one line on every
    rank; the half-written directory is removed and the previous checkpoint stays the latest.
    """
    iteration = ts.iteration
    final = checkpoint_dir(args.save, iteration)
    tmp = final + ".inprogress"
    rank = dist.get_rank()
    error: UsageError | None = None
    try:
        if rank == 0:
            os.makedirs(args.save, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)  # leftover of a crashed save of this same iteration
        _agree(None)
        tensors, param_groups = _tensor_state(model, optimizer, not args.no_save_optim)
        dcp.save(tensors, checkpoint_id=tmp)
        if not args.no_save_rng:
            os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
            rng_file = os.path.join(tmp, "rng", f"rank_{rank:05d}.json")
            _write_json_atomic(rng_file, rng_state_to_json())
    except (OSError, CheckpointException) as e:
        error = save_failure(e, args.save, iteration)
        if error is None:
            raise
    _agree_or_remove(error, tmp)
    if rank == 0:
        try:
            copy_tokenizer_files(vars(args), tmp)
            meta = {
                "format_version": FORMAT_VERSION,
                "iteration": iteration,
                "train_state": dict(vars(ts)),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": scaler.state_dict(),
                "param_groups": param_groups if not args.no_save_optim else None,
                "layout": layout_of(state),
                "args": _jsonable_args(args),
            }
            publish_checkpoint(args.save, tmp, meta)
        except OSError as e:
            error = save_failure(e, args.save, iteration)
        except UsageError as e:
            error = e
        if error is None:
            _follow_tokenizer_copy(args, final)
            _prune(args)
            logger.info(
                "  successfully saved checkpoint at iteration %7d to %s", iteration, args.save
            )
    _agree_or_remove(error, tmp)
    return final


def _agree_or_remove(error: UsageError | None, tmp: str) -> None:
    """``_agree``; when a rank failed, rank 0 first removes the half-written directory."""
    try:
        _agree(error)
    except UsageError:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _follow_tokenizer_copy(args, final: str) -> None:
    """Tokenizer files read from a checkpoint inside --save (which pruning may delete) are
    read from the newest copy from now on."""
    root = os.path.abspath(args.save) + os.sep
    paths = [getattr(args, k, None) for k in FILE_ARGS]
    if any(p and os.path.abspath(p).startswith(root) for p in paths):
        for key, path in checkpoint_tokenizer_args(args.tokenizer_type, final).items():
            setattr(args, key, path)


def check_save_start(args, start: int, last: int) -> None:
    """Before the first iteration: --save holds no complete checkpoint this run could write
    (iterations ``start + 1`` to ``last``), so none is ever overwritten."""
    if not args.save or not os.path.isdir(args.save):
        return
    clash = [i for i in _list_complete(args.save) if start < i <= last]
    if clash:
        raise UsageError(
            f"--save {args.save} already holds complete checkpoints at iterations "
            f"{', '.join(map(str, clash))}, which this run (iterations {start + 1} to {last}) "
            f"would overwrite; resume from them with --load {checkpoint_dir(args.save, clash[-1])}, "
            "or pass a new --save"
        )


def check_save_writable(args) -> None:
    """At start-up: every rank can create a file in --save."""
    if args.save:
        probe_writable(args.save, dist.get_rank() if dist.is_initialized() else 0)


def _list_complete(root: str) -> list[int]:
    out = []
    for name in os.listdir(root):
        if re.fullmatch(r"iter_[0-9]+", name) and is_complete(os.path.join(root, name)):
            out.append(int(name[5:]))
    return sorted(out)


def _prune(args) -> None:
    keep = args.keep_last_n_checkpoints
    if not keep:
        return
    for iteration in _list_complete(args.save)[:-keep]:
        shutil.rmtree(checkpoint_dir(args.save, iteration), ignore_errors=True)


def find_checkpoint(root: str, announce: bool = False) -> str | None:
    """The checkpoint directory ``--load root`` means (None: there is none).

    ``root`` itself when it is a complete checkpoint (an ``iter_*`` directory); else the one
    the tracker names, or the newest complete one when the tracker is missing or names a
    half-written one. ``announce`` logs which was chosen when it is not the tracker's.
    """
    if is_complete(root):
        if announce:
            logger.info("  --load %s is a checkpoint directory: loading it", root)
        return root
    if not os.path.isdir(root):
        return None
    foreign = load_hint(root)  # Megatron-LM / Megatron-DeepSpeed: name the import command
    if foreign is not None:
        raise UsageError(foreign)
    if directory_iteration(root) is not None:
        raise UsageError(
            f"--load {root}: this checkpoint directory is incomplete (no {META} or .metadata); "
            "name a complete iter_* directory or the --save directory above it"
        )
    tracker = os.path.join(root, TRACKER)
    complete = _list_complete(root)
    if not os.path.isfile(tracker):
        if not complete:
            return None
        path = checkpoint_dir(root, complete[-1])
        if announce:
            logger.warning(
                "WARNING: --load %s has no %s; resuming from the newest complete checkpoint, %s",
                root,
                TRACKER,
                path,
            )
        return path
    path = checkpoint_dir(root, read_tracker(tracker))
    if is_complete(path):
        return path
    if not complete:
        raise UsageError(
            f"--load {root}: the tracker names {path}, which is incomplete, and no complete checkpoint exists"
        )
    fallback = checkpoint_dir(root, complete[-1])
    logger.warning(
        "WARNING: %s is incomplete (an interrupted save?); loading %s instead", path, fallback
    )
    return fallback


def read_meta(path: str) -> dict:
    """``path/meta.json``, every field checked (one line naming the file if it is damaged)."""
    meta_path = os.path.join(path, META)
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{meta_path}: cannot read checkpoint metadata ({e.strerror})") from None
    return parse_meta(raw, meta_path)


def load_checkpoint(
    args, state: ParallelState, model, optimizer, scheduler, scaler, ts
) -> str | None:
    """Restore what ``--load`` names into the given objects (in place); the directory loaded."""
    if not args.load:
        return None
    path = find_checkpoint(args.load, announce=True)
    if path is None:
        if args.exit_on_missing_checkpoint:
            raise UsageError(
                f"--load {args.load}: no checkpoint there, and --exit-on-missing-checkpoint was given"
            )
        logger.warning(
            "WARNING: could not find a checkpoint in --load %s; training from scratch", args.load
        )
        return None
    meta = read_meta(path)
    meta_path = os.path.join(path, META)
    load_optim = (
        optimizer is not None
        and not (args.finetune or args.no_load_optim)
        and meta.get("param_groups") is not None
    )
    tensors, param_groups = _tensor_state(model, optimizer, load_optim)
    reader = SafeFileSystemReader(path)
    check_storage_files(reader, path)
    try:
        dcp.load(tensors, storage_reader=reader, planner=SafeLoadPlanner())
    except UsageError:
        raise
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps errors per rank
        raise load_failure(e, path) from None
    if load_optim:
        optim_sd = {"state": tensors["optim_state"], "param_groups": meta["param_groups"]}
        apply_json_state(
            "'param_groups'",
            meta_path,
            lambda: set_state_dict(
                model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim_sd
            ),
            "load another checkpoint or pass --no-load-optim",
        )
    else:
        set_model_state_dict(model, tensors["model"])
    if args.finetune:
        logger.info("  loaded model weights from %s for fine-tuning (iteration reset to 0)", path)
        return path
    for key, value in meta["train_state"].items():
        if hasattr(ts, key):
            setattr(ts, key, value)
    if meta.get("param_groups") is None and not args.no_load_optim:
        logger.info(
            "  %s holds weights only (no optimizer state): the optimizer starts fresh", path
        )
    if not args.no_load_optim:
        fix = "load another checkpoint or pass --no-load-optim"
        # The scheduler applies --override-opt_param-scheduler itself (Megatron's rule).
        apply_json_state(
            "'scheduler'", meta_path, lambda: scheduler.load_state_dict(meta["scheduler"]), fix
        )
        if args.fp16 and meta.get("grad_scaler"):
            apply_json_state(
                "'grad_scaler'", meta_path, lambda: scaler.load_state_dict(meta["grad_scaler"]), fix
            )
    error = None
    try:
        _restore_rng(args, state, path, meta)
    except UsageError as e:
        error = e
    _agree(error)  # every rank's RNG file is its own: all stop if one is bad
    logger.info("  successfully loaded checkpoint from %s at iteration %d", path, ts.iteration)
    return path


def _restore_rng(args, state: ParallelState, path: str, meta: dict) -> None:
    if args.no_load_rng:
        return
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.json")
    same_layout = {"cp": 1, **meta["layout"]} == layout_of(state)
    if same_layout and os.path.isfile(rng_file):

        def restore() -> None:
            with open(rng_file, "rb") as f:
                rng_state_from_json(json.loads(f.read().decode("utf-8")))

        apply_json_state(
            "RNG state", rng_file, restore, "pass --no-load-rng to start fresh RNG streams"
        )
        return
    # Another layout: rank r's saved stream belongs to different work. Derive fresh streams.
    set_random_seed(args.seed + 7919 * meta["iteration"], dropout_seed_offset(state))
    logger.info(
        "  the layout changed (%s -> %s): per-rank RNG states re-derived from --seed and the iteration",
        meta["layout"],
        layout_of(state),
    )


def load_args_from_checkpoint(args: argparse.Namespace) -> None:
    """--use-checkpoint-args: the model-shape flags from the checkpoint's meta.json, and its
    tokenizer (files from its ``tokenizer/`` directory) unless the command line names one."""
    path = find_checkpoint(args.load) if args.load else None
    if path is None:
        raise UsageError("--use-checkpoint-args needs --load pointing at a checkpoint")
    saved = read_meta(path)["args"]
    for key in MODEL_SHAPE_ARG_KEYS:
        if key in saved:
            setattr(args, key, saved[key])
    use_checkpoint_tokenizer(args, saved, path)
