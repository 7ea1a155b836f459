"""Which foreign checkpoint layout a directory holds (judged by file names; nothing is read
but the small tracker files)."""

from __future__ import annotations

import os
import re

from megatron.checkpointing.foreign.common import read_text_tracker

IMPORT_HINT = "python tools/checkpoint_convert.py import --from {src} --to NEW_DIR"
MLM_TRACKER = "latest_checkpointed_iteration.txt"
MLM_RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
MLM_MODEL_FILE = "model_optim_rng.pt"
DS_MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
DS_ZERO3_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def mlm_iteration_dir(root: str) -> str:
    """The ``iter_*`` (or ``release``) directory that Megatron-LM's tracker in ``root`` names."""
    tracker = os.path.join(root, MLM_TRACKER)
    if os.path.isfile(tracker):
        text = read_text_tracker(tracker, r"[0-9]{1,12}|release")
        return os.path.join(root, "release" if text == "release" else f"iter_{int(text):07d}")
    return root


def mlm_rank_dirs(path: str) -> dict[tuple[int, int], str]:
    """(TP rank, PP rank) -> ``mp_rank_*`` directory holding ``model_optim_rng.pt``."""
    out = {}
    for name in os.listdir(path) if os.path.isdir(path) else []:
        m = MLM_RANK_DIR.fullmatch(name)
        if m and os.path.isfile(os.path.join(path, name, MLM_MODEL_FILE)):
            out[(int(m.group(1)), int(m.group(2) or 0))] = os.path.join(path, name)
    return out


def is_torch_dist(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "common.pt")) and os.path.isfile(
        os.path.join(path, ".metadata")
    )


def ds_tag_dir(root: str) -> str:
    """The ``global_step*`` directory that ``root`` means (via ``latest_universal``/``latest``)."""
    for tracker in ("latest_universal", "latest"):
        file = os.path.join(root, tracker)
        if os.path.isfile(file):
            # a tag names a directory inside root: never "." or ".."
            tag = read_text_tracker(file, r"(?!\.\.?$)[A-Za-z0-9_.-]{1,200}")
            return os.path.join(root, tag)
    return root


def is_deepspeed_tag(path: str) -> bool:
    names = os.listdir(path) if os.path.isdir(path) else []
    return any(DS_MODEL_FILE.fullmatch(n) or n == DS_ZERO3_MODEL_FILE for n in names)


def foreign_layout(path: str) -> str | None:
    """ "Megatron-DeepSpeed", "Megatron-LM legacy torch", "Megatron-LM torch_dist" or None."""
    if not os.path.isdir(path):
        return None
    names = set(os.listdir(path))
    if "latest" in names or "latest_universal" in names or is_deepspeed_tag(path):
        return "Megatron-DeepSpeed"
    tracker = os.path.join(path, MLM_TRACKER)
    try:
        it = mlm_iteration_dir(path)
    except Exception:  # noqa: BLE001 - ours checks its tracker itself
        return None
    if mlm_rank_dirs(it):
        return "Megatron-LM legacy torch"
    if is_torch_dist(it) and (it != path or not os.path.isfile(tracker)):
        return "Megatron-LM torch_dist"
    return None


def load_hint(path: str) -> str | None:
    """The one line for ``--load`` naming a foreign layout (None: not a foreign layout)."""
    layout = foreign_layout(path)
    if layout is None:
        return None
    return (
        f"--load {path}: a {layout} checkpoint, not this project's format; import it once "
        f"with `{IMPORT_HINT.format(src=path)}` and pass --load NEW_DIR"
    )
