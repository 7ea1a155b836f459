"""On-disk cache of dataset index maps (``.npy``), built once per node and shared by ranks.

Files are named by a hash of everything that shapes them, so a change of data, split, seed,
sample count or sequence length gets new files instead of stale ones. Local rank 0 of each
node builds missing files (writing to a temporary name, then ``os.replace``, so a reader
never sees half a file) while the other ranks wait on a barrier; then every rank memory-maps
them with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from megatron.errors import UsageError

logger = logging.getLogger(__name__)


def description_hash(description: dict[str, Any]) -> str:
    """Stable hex digest of a JSON-serialisable description."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _dist():
    """``torch.distributed`` if a process group is initialised, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def is_local_builder() -> bool:
    """Whether this process builds cache files: local rank 0 of its node (or the only one)."""
    dist = _dist()
    if dist is None:
        return True
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    local_world = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local_world.isdigit() and int(local_world) > 0:
        return dist.get_rank() % int(local_world) == 0
    return dist.get_rank() == 0


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def _load(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path}: unreadable index-cache file ({exc}); delete it and rerun"
        ) from None


def cached_arrays(
    cache_dir: str | None,
    stem: str,
    description: dict[str, Any],
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Arrays ``names`` for ``description``: loaded from ``cache_dir`` or built and saved.

    With ``cache_dir=None`` they are built in memory on every rank (no files).
    """
    if cache_dir is None:
        return build()
    key = description_hash(description)
    paths = {name: os.path.join(cache_dir, f"{stem}-{key}-{name}.npy") for name in names}
    error: Exception | None = None
    if is_local_builder() and not all(os.path.isfile(p) for p in paths.values()):
        try:
            _build_and_save(cache_dir, key, stem, description, paths, build)
        except Exception as exc:  # re-raised after the barrier so no rank waits forever
            error = exc
    dist = _dist()
    if dist is not None:
        dist.barrier()
    if error is not None:
        raise error
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UsageError(
            f"{missing[0]}: index-cache file missing after the build; the cache directory "
            "must be visible to every rank of a node (set --data-cache-path to a shared "
            "directory, and LOCAL_RANK for each process)"
        )
    return {name: _load(path) for name, path in paths.items()}


def _build_and_save(
    cache_dir: str,
    key: str,
    stem: str,
    description: dict[str, Any],
    paths: dict[str, str],
    build: Callable[[], dict[str, np.ndarray]],
) -> None:
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"--data-cache-path {cache_dir}: cannot create the index-cache directory ({exc}); "
            "pass a writable --data-cache-path"
        ) from None
    start = time.perf_counter()
    arrays = build()
    try:
        for name, path in paths.items():
            _save(path, arrays[name])
        desc_path = os.path.join(cache_dir, f"{stem}-{key}-description.json")
        tmp = f"{desc_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, desc_path)
    except OSError as exc:
        raise UsageError(
            f"--data-cache-path {cache_dir}: cannot write index-cache files ({exc}); pass a "
            "writable --data-cache-path"
        ) from None
    logger.info(
        "built index maps %s-%s in %.2f s (in %s)",
        stem,
        key,
        time.perf_counter() - start,
        cache_dir,
    )
