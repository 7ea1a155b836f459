"""What a checkpoint's JSON files must hold, and where a run may save: one-line errors.

Everything read from a checkpoint directory is checked before it is used (the tracker, each
``meta.json`` field, the RNG files), and ``--save`` is probed for writability at start-up;
a failed save names the disk error instead of showing a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from typing import Any

from megatron.errors import UsageError

_ITER_DIR = re.compile(r"iter_([0-9]+)")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def read_tracker(tracker: str) -> int:
    """The iteration number in ``latest_checkpointed_iteration.txt``."""
    try:
        with open(tracker, "rb") as f:
            text = f.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{tracker}: cannot read the iteration number ({type(e).__name__}); delete the file "
            "to resume from the newest complete iter_* directory"
        ) from None
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise UsageError(
            f"{tracker}: expected an iteration number, found {text[:40]!r}; delete the file to "
            "resume from the newest complete iter_* directory"
        )
    return int(text)


def directory_iteration(path: str) -> int | None:
    """N of a directory named ``iter_N`` (None for another name)."""
    match = _ITER_DIR.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_meta(raw: bytes, meta_path: str) -> dict[str, Any]:
    """``meta.json``'s content, every field the loader uses checked (type and range)."""

    def bad(why: str) -> UsageError:
        return UsageError(
            f"{meta_path}: {why}; the checkpoint is damaged: restore it or load another one"
        )

    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not UTF-8 JSON ({e})") from None
    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, found {type(meta).__name__}")
    iteration = meta.get("iteration")
    if not _is_count(iteration):
        raise bad(f"iteration {iteration!r} is not a non-negative integer")
    named = directory_iteration(os.path.dirname(meta_path))
    if named is not None and named != iteration:
        raise bad(f"iteration {iteration} differs from its directory's {named}")
    for key, kind in (("train_state", dict), ("scheduler", dict), ("args", dict)):
        if not isinstance(meta.get(key), kind):
            raise bad(f"{key!r} is missing or not a JSON object")
    if not isinstance(meta.get("grad_scaler", {}), dict):
        raise bad("'grad_scaler' is not a JSON object")
    if not isinstance(meta.get("param_groups"), list | type(None)):
        raise bad("'param_groups' is neither a list nor null")
    version = meta.get("format_version", 1)
    if version not in (1, 2):
        raise bad(f"format_version {version!r} is not 1 or 2 (a newer release wrote it?)")
    layout = meta.get("layout")
    keys = ("world_size", "sp", "dp") + (("cp",) if version >= 2 else ())
    if not isinstance(layout, dict) or not all(
        _is_count(layout.get(k)) and layout[k] > 0 for k in keys
    ):
        raise bad(f"'layout' {layout!r} lacks positive {', '.join(keys)}")
    bad_counts = {k: v for k, v in meta["train_state"].items() if not _is_count(v)}
    if bad_counts or meta["train_state"].get("iteration", iteration) != iteration:
        raise bad(f"'train_state' holds {bad_counts or meta['train_state']}, not counts of it")
    return meta


def apply_json_state(what: str, path: str, apply: Callable[[], None], fix: str) -> None:
    """Run ``apply`` (restoring state read from ``path``); a malformed value is one line."""
    try:
        apply()
    except (KeyError, TypeError, ValueError, OverflowError, IndexError, RuntimeError) as e:
        raise UsageError(
            f"{path}: {what} is malformed ({type(e).__name__}: {str(e)[:120]}); {fix}"
        ) from None


def probe_writable(save: str, rank: int) -> None:
    """Create and remove a file in ``--save`` (made if missing): fail now, not at the first save."""
    probe = os.path.join(save, f".write_probe_rank_{rank}")
    try:
        os.makedirs(save, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as e:
        raise UsageError(
            f"--save {save}: cannot write there ({e.strerror}); pass a writable directory"
        ) from None


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (directly, chained, or in a DCP CheckpointException)."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            seen += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
        seen += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


def _short_write(exc: BaseException) -> BaseException | None:
    """torch's zip writer's error after a short write (a file-size limit or a full disk)."""
    failures = getattr(exc, "failures", None) or {}
    for e in [exc, *(f[0] for f in failures.values() if isinstance(f, tuple) and f)]:
        if isinstance(e, RuntimeError) and re.search(
            r"inline_container|PytorchStreamWriter", str(e)
        ):
            return e
    return None


def save_failure(exc: BaseException, save: str, iteration: int) -> UsageError | None:
    """A one-line error for a save that failed on the file system (None: not a disk error)."""
    keep = (
        "the previous checkpoint stays the latest: free space (or raise the quota or file "
        f"size limit) and resume with --load {save}"
    )
    err = os_error_in(exc)
    if err is None:
        short = _short_write(exc)
        if short is None:
            return None
        first = str(short).splitlines()[0][:100]
        return UsageError(
            f"--save {save}: writing the checkpoint of iteration {iteration} stopped short "
            f"({first}): a full disk, a quota or a file size limit; {keep}"
        )
    where = f" ({err.strerror or type(err).__name__}: {err.filename})" if err.filename else ""
    where = where or f" ({err.strerror or err})"
    if err.errno in _DISK_FULL:
        return UsageError(
            f"--save {save}: no room to write the checkpoint of iteration {iteration}{where}; "
            + keep
        )
    return UsageError(
        f"--save {save}: cannot write the checkpoint of iteration {iteration}{where}; the "
        f"previous checkpoint stays the latest: fix the directory and resume with --load {save}"
    )
