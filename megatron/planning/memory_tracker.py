"""Tensor-level memory measurement on any device (a CPU stand-in for CUDA's peak counter).

Counts the bytes of the storages created while the mode is active, at their current size
(FSDP2 frees by resizing storages; a DTensor counts its local shard), with the peak since
``reset_peak``. Used to hold ``megatron.planning.memory_model`` against real runs on CPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Live bytes of storages created under this mode; ``peak`` since ``reset_peak``."""

    def __init__(self, exclude: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self._excluded = {id(t.untyped_storage()) for t in exclude}  # e.g. existing params
        self.peak = 0

    def current(self) -> int:
        return sum(s.nbytes() for s in (r() for r in self._live.values()) if s is not None)

    def reset_peak(self) -> None:
        self.peak = self.current()

    def _forget(self, key: int) -> None:
        self._live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        grew = False
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = (t._local_tensor if isinstance(t, DTensor) else t).untyped_storage()
            key = id(storage)
            if key not in self._live and key not in self._excluded:
                self._live[key] = weakref.ref(storage)
                weakref.finalize(storage, self._forget, key)
                grew = True
        if grew:
            self.peak = max(self.peak, self.current())
        return out
