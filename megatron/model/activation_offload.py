"""``--checkpoint-in-cpu``: the inputs that recomputed groups of layers keep for backward wait
in pinned host memory, moved without stalling the compute stream.

One :class:`HostOffload` serves one forward pass and its backward (its ``hooks()`` go around
each ``checkpoint`` call). Each input that needs a gradient (the residual stream; shared
tables such as RoPE's cos/sin and document ids stay on the GPU, one copy for all groups) is
copied to the host on a side stream that first waits for the compute stream, so forward
goes on while the copy runs; the caching allocator reuses the GPU memory only once the copy
is done (``record_stream``). In backward, when a group's recomputation asks for its input,
the previous group's input (the next one backward needs) starts its copy back on a second
side stream, so it is on the GPU before that group's recomputation starts: at most two
groups' inputs are on the GPU at a time. The compute stream waits on events only. Tensors
that are not on a GPU are kept as they are (on CPU this is the plain path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_STREAMS: dict[tuple[str, torch.device], torch.cuda.Stream] = {}


def _side_stream(kind: str, device: torch.device) -> torch.cuda.Stream:
    if (kind, device) not in _STREAMS:
        _STREAMS[(kind, device)] = torch.cuda.Stream(device)
    return _STREAMS[(kind, device)]


@dataclass
class _Packed:
    index: int
    device: torch.device
    host: torch.Tensor  # pinned copy
    copied: torch.cuda.Event  # the copy to the host is done
    on_device: torch.Tensor | None = None  # brought back ahead of time
    ready: torch.cuda.Event | None = None  # ... and that copy is done


class HostOffload:
    """Saved-tensor hooks moving one forward's checkpointed inputs to the host and back."""

    def __init__(self) -> None:
        self._packed: list[_Packed] = []

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if not (t.is_cuda and t.requires_grad):
            return t
        compute = torch.cuda.current_stream(t.device)
        d2h = _side_stream("d2h", t.device)
        d2h.wait_stream(compute)  # t has been written
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        # the name tells the GPU validation's profiler that this path ran
        with torch.profiler.record_function("HostOffload.pack"), torch.cuda.stream(d2h):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(d2h)
        t.record_stream(d2h)  # its memory is reused only after the copy
        packed = _Packed(len(self._packed), t.device, host, copied)
        self._packed.append(packed)
        return packed

    def _bring_back(self, packed: _Packed) -> None:
        h2d = _side_stream("h2d", packed.device)
        h2d.wait_event(packed.copied)
        with torch.cuda.stream(h2d):
            packed.on_device = packed.host.to(packed.device, non_blocking=True)
            packed.ready = torch.cuda.Event()
            packed.ready.record(h2d)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.on_device is None:  # not brought back ahead (the first group of backward)
            self._bring_back(packed)
        t, ready = packed.on_device, packed.ready
        packed.on_device = packed.ready = None
        compute = torch.cuda.current_stream(packed.device)
        compute.wait_event(ready)
        t.record_stream(compute)  # allocated on the side stream, used and freed on this one
        if packed.index > 0:  # the previous group's input: the next one backward needs
            previous = self._packed[packed.index - 1]
            if previous.on_device is None:
                self._bring_back(previous)
        return t
