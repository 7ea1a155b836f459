"""Loading a checkpoint never runs code from it.

torch.distributed.checkpoint unpickles in two places (torch 2.13): the file-system reader
loads ``.metadata`` with plain ``pickle.load``, and the default load planner reads every
non-tensor item with ``torch.load(..., weights_only=False)``. Here the metadata goes
through an unpickler that admits only DCP's metadata classes and a few torch/builtin
types, and non-tensor items are loaded with ``weights_only=True`` (our checkpoints keep
non-tensor state in JSON, so there are none).
"""

from __future__ import annotations

import io
import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata

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
    """Admits DCP's metadata classes (plain dataclasses and enums) and a few torch types."""

    def find_class(self, module: str, name: str):
        obj = (
            super().find_class(module, name)
            if module.startswith(("torch", "collections", "pathlib"))
            else None
        )
        allowed = (module, name) in _ALLOWED_GLOBALS
        if module == _METADATA_MODULE and isinstance(obj, type) and obj.__module__ == module:
            allowed = True  # the metadata dataclasses, plus its enum _MEM_FORMAT_ENCODING
        if module == "torch" and isinstance(obj, _TORCH_ENUMS):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata load admits only DCP's own classes."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise UsageError(f"{path}: refused to load checkpoint metadata ({e})") from None
        except (OSError, EOFError, ValueError) as e:
            raise UsageError(
                f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(metadata, Metadata):
            raise UsageError(f"{path}: not checkpoint metadata (found {type(metadata).__name__})")
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    """Every data file the metadata names exists and is long enough (names the bad file)."""
    metadata = reader.read_metadata()
    reader.storage_data = metadata.storage_data
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        needed[rel] = max(needed.get(rel, 0), info.offset + info.length)
    for rel, end in needed.items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            raise UsageError(f"{file}: missing checkpoint data file")
        size = os.path.getsize(file)
        if size < end:
            raise UsageError(
                f"{file}: truncated checkpoint data file ({size} bytes, expected at least {end})"
            )
