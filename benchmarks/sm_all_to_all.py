"""All-to-all of equal blocks through symmetric memory, pulled by SM loads over NVLink (CUDA).

Each rank packs its send blocks into a workspace that every peer of the group can address
(``torch.distributed._symmetric_memory``); after a barrier, one Triton kernel on every rank
loads its block from each peer's workspace and stores it into an ordinary receive tensor.
A benchmark option (``bench_all_to_all.py``, impls ``symm``/``symmraw``): on 4 H100s it
moved data no faster than NCCL's all-to-all (docs/performance.md), so the model uses NCCL.

Two workspaces alternate, so one barrier per exchange is enough: a rank writes workspace A
for exchange k+2 only after the barrier of exchange k+1, which every peer reaches only after
its pull of exchange k (stream order). Every rank must make the same calls in the same order,
as with any collective, on one CUDA stream.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

_ELEM = torch.int32  # the kernel moves 4-byte words; blocks must be a multiple of 16 bytes


def _pull_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def pull(
        base,  # this rank's workspace (int32 words); the peers' are at base + deltas[j]
        deltas,  # [P + 1] int64: word offsets of the peers' workspaces, then this rank's index
        dst,  # [P, n] receive tensor (int32 words)
        n,  # words per block
        P: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0)  # one tile per program: P * cdiv(n, BLOCK) of them
        j = t % P  # consecutive tiles come from different peers: every link stays busy
        me = tl.load(deltas + P)
        delta = tl.multiple_of(tl.load(deltas + j), 4)
        offs = (t // P).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(base + delta + me * n + offs, mask=mask)
        tl.store(dst + j.to(tl.int64) * n + offs, x, mask=mask)

    return pull


_KERNEL = None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SymmMemAllToAll:
    """Equal-block all-to-all over one NCCL process group; see the module docstring.

    Usage: ``send = a2a.send_buffer(shape, dtype)`` (``shape[0]`` = group size, block r for
    rank r), fill it, then ``a2a.exchange(send, recv)`` (``recv[j]`` = rank j's block for this
    rank, ``recv`` contiguous and shaped like ``send``).
    """

    def __init__(self, group: dist.ProcessGroup, block: int = 4096, warps: int = 4) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.block, self.warps = block, warps
        self._nbytes = 0
        self._bufs: list[torch.Tensor] = []
        self._deltas: list[torch.Tensor] = []
        self._handles: list = []
        self._next = 0  # which workspace the next send_buffer returns

    def _allocate(self, nbytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        # Round up so that slowly growing shapes do not re-allocate every call.
        nbytes = 1 << max(20, math.ceil(math.log2(nbytes)))
        torch.cuda.current_stream().synchronize()  # the old workspaces may still be read
        dist.barrier(group=self.group)
        self._bufs, self._deltas, self._handles = [], [], []
        for _ in range(2):
            buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
            handle = symm_mem.rendezvous(buf, self.group)
            own = buf.data_ptr()
            words = [(ptr - own) // _ELEM.itemsize for ptr in handle.buffer_ptrs]
            if any((ptr - own) % 16 for ptr in handle.buffer_ptrs):
                raise RuntimeError("symmetric-memory workspaces are not 16-byte aligned")
            words.append(self.rank)
            self._deltas.append(torch.tensor(words, dtype=torch.int64, device=self.device))
            self._bufs.append(buf)
            self._handles.append(handle)
        self._nbytes = nbytes

    def send_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next workspace as a ``shape`` tensor, valid until the exchange after next."""
        if shape[0] != self.world:
            raise ValueError(f"send_buffer: shape[0] {shape[0]} != group size {self.world}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes % (16 * self.world):
            raise ValueError(f"send_buffer: {nbytes} bytes is not 16-byte blocks x {self.world}")
        if nbytes > self._nbytes:
            self._allocate(nbytes)
        buf = self._bufs[self._next]
        return buf[:nbytes].view(dtype).view(shape)

    def exchange(self, send: torch.Tensor, recv: torch.Tensor) -> torch.Tensor:
        """``recv[j] = send_j[rank]`` for every rank j; ``send`` is the last ``send_buffer``."""
        global _KERNEL
        i = self._next
        if send.data_ptr() != self._bufs[i].data_ptr():
            raise ValueError("exchange: send is not the buffer the last send_buffer returned")
        if not recv.is_contiguous() or recv.numel() != send.numel() or recv.dtype != send.dtype:
            raise ValueError("exchange: recv must be contiguous and shaped like send")
        self._next = 1 - i
        self._handles[i].barrier(channel=0)  # every peer's blocks are in its workspace
        if _KERNEL is None:
            _KERNEL = _pull_kernel()
        words = send.numel() * send.element_size() // _ELEM.itemsize // self.world
        _KERNEL[(self.world * triton_cdiv(words, self.block),)](
            self._bufs[i].view(_ELEM),
            self._deltas[i],
            recv.view(-1).view(_ELEM),
            words,
            P=self.world,
            BLOCK=self.block,
            num_warps=self.warps,
        )
        return recv
