"""Loading a checkpoint never runs code from it, nor reads a file outside it.

torch.distributed.checkpoint unpickles in two places (torch 2.13): the file-system reader
loads ``.metadata`` with plain ``pickle.load``, and the default load planner reads every
non-tensor item with ``torch.load(..., weights_only=False)``. Here the metadata goes
through an unpickler that admits only DCP's metadata classes and a few torch/builtin
types (checked by name before anything is imported), and non-tensor items are loaded with
``weights_only=True`` (our checkpoints keep non-tensor state in JSON, so there are none).
Every data file the metadata names must be a relative path without ``..``; a data file
that fails to load is named in a one-line error.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import sys
import warnings
from pathlib import PurePosixPath

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from megatron.errors import UsageError

_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),  # maps a name such as "torch.strided" to a layout
    ("pathlib", "PosixPath"),  # the checkpoint id DCP records
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes (plain dataclasses and enums) and a few torch types.

    A global is judged by its (module, name) text and by what already-imported modules hold,
    so a refused name never causes an import.
    """

    def find_class(self, module: str, name: str):
        loaded = sys.modules.get(module)
        obj = vars(loaded).get(name) if loaded is not None else None
        allowed = (module, name) in _ALLOWED_GLOBALS
        if module == _METADATA_MODULE and isinstance(obj, type) and obj.__module__ == module:
            allowed = True  # the metadata dataclasses, plus its enum _MEM_FORMAT_ENCODING
        if module == "torch" and isinstance(obj, _TORCH_ENUMS):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj if obj is not None else super().find_class(module, name)


def check_relative_path(rel: object, metadata_path: str) -> str:
    """A data file name from the metadata: relative, inside the checkpoint (judged by text)."""
    if not isinstance(rel, str) or not rel:
        raise UsageError(f"{metadata_path}: names a data file {rel!r}, which is not a file name")
    if os.path.isabs(rel) or ".." in PurePosixPath(rel).parts or "\\" in rel:
        raise UsageError(
            f"{metadata_path}: names the data file {rel!r}, outside the checkpoint directory; "
            "refused (restore the checkpoint from its source)"
        )
    return rel


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata load admits only DCP's own classes and data files
    inside the checkpoint, and whose data errors name the file."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise UsageError(f"{path}: refused to load checkpoint metadata ({e})") from None
        except Exception as e:  # noqa: BLE001 - any damage is reported the same way
            raise UsageError(
                f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        if not isinstance(metadata, Metadata):
            raise UsageError(f"{path}: not checkpoint metadata (found {type(metadata).__name__})")
        if not isinstance(metadata.storage_data, dict):
            raise UsageError(f"{path}: damaged checkpoint metadata (no storage table)")
        for info in metadata.storage_data.values():
            check_relative_path(getattr(info, "relative_path", None), path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """DCP's read, one data file at a time, so that a file that fails is named."""
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        for rel, items in per_file.items():
            file = os.path.join(self.path, check_relative_path(rel, self.path))
            try:
                with warnings.catch_warnings():  # torch's notes on damaged data: the error says it
                    warnings.simplefilter("ignore")
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 - damaged data: name the file, not torch's advice
                raise UsageError(
                    f"{file}: cannot load checkpoint tensors from it ({type(e).__name__}); the "
                    "file is damaged or not part of this checkpoint: restore it or load another "
                    "checkpoint"
                ) from None
        fut: Future = Future()
        fut.set_result(None)
        return fut


class SafeLoadPlanner(DefaultLoadPlanner):
    """Load planner that reads non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any refusal is reported the same way
            raise UsageError(
                f"checkpoint item {read_item.dest_index.fqn!r} is not plain data; refused to unpickle it ({str(e)[:200]})"
            ) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def check_storage_files(reader: SafeFileSystemReader, path: str) -> None:
    """Every data file the metadata names exists, is not a symbolic link and is long enough
    (names the bad file)."""
    metadata = reader.read_metadata()
    reader.storage_data = metadata.storage_data
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = check_relative_path(getattr(info, "relative_path", None), path)
        needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
    for rel, end in needed.items():
        file = os.path.join(path, rel)
        if os.path.islink(file):
            raise UsageError(
                f"{file}: a symbolic link; checkpoint data files are read only from the checkpoint itself"
            )
        if not os.path.isfile(file):
            raise UsageError(f"{file}: missing checkpoint data file")
        size = os.path.getsize(file)
        if size < end:
            raise UsageError(
                f"{file}: truncated checkpoint data file ({size} bytes, expected at least {end})"
            )


def load_failure(exc: BaseException, path: str) -> UsageError:
    """One line for a DCP load of checkpoint ``path`` that failed (DCP wraps each rank's
    error in a CheckpointException): the UsageError raised inside, else the checkpoint named."""
    failures = getattr(exc, "failures", None) or {}
    inner = [f[0] for f in failures.values() if isinstance(f, tuple) and f] or [exc]
    for e in inner:
        if isinstance(e, UsageError):
            return e
    return UsageError(
        f"checkpoint {path}: cannot load its tensors ({type(inner[0]).__name__}); restore it or "
        "load another checkpoint"
    )
