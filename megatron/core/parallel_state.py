"""Parallel state: one validated object built from a DeviceMesh, plus Megatron's getters.

Rank layout (outermost to innermost): pipeline, data, context (ring), sequence (Ulysses),
tensor. A rank's coordinates are ``rank = (((pp * DP + dp) * CP + cp) * SP + sp) * TP + tp``,
so Ulysses groups are contiguous blocks of ranks (their all-to-alls stay inside a node), ring
(context-parallel) groups are strided by ``SP * TP`` (they may span nodes: ring attention
sends one K/V block to one neighbour at a time) and data-parallel groups by ``CP * SP * TP``.
The sequence is sharded over the CP x SP ranks (the "sequence group", where the loss is
averaged); the sequence-data-parallel group (DP x CP x SP) is where gradients are reduced
and ZeRO shards live.

The module-level getters (``get_sequence_parallel_group`` ...) are thin accessors over the
one :class:`ParallelState` kept here, for code written against Megatron's ``mpu``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron.errors import UsageError

MESH_DIMS = ("pp", "dp", "cp", "sp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; ``dp`` is derived from the world size. ``sp`` is the Ulysses
    (all-to-all) degree, ``cp`` the ring (context-parallel) degree."""

    world_size: int
    tp: int = 1
    pp: int = 1
    sp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for name, value in (
            ("world size", self.world_size),
            ("TP", self.tp),
            ("PP", self.pp),
            ("SP", self.sp),
            ("CP", self.cp),
        ):
            if value < 1:
                raise UsageError(f"parallel layout: {name} must be >= 1, got {value}")
        model = self.tp * self.pp * self.sp * self.cp
        if self.world_size % model != 0:
            raise UsageError(
                f"world size {self.world_size} is not divisible by tensor-parallel ({self.tp}) x "
                f"pipeline-parallel ({self.pp}) x sequence-parallel ({self.sp}) x "
                f"context-parallel ({self.cp}) = {model}; "
                "change --tensor-model-parallel-size, --pipeline-model-parallel-size, "
                "--ds-sequence-parallel-size, --context-parallel-size or the number of processes"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.sp * self.cp)

    @property
    def seq(self) -> int:
        """Ranks one sequence is sharded over: Ulysses x ring."""
        return self.sp * self.cp

    @property
    def mesh_shape(self) -> tuple[int, int, int, int, int]:
        return (self.pp, self.dp, self.cp, self.sp, self.tp)

    def describe(self) -> str:
        ring = f"CP {self.cp} x " if self.cp > 1 else ""
        return (
            f"world {self.world_size} = PP {self.pp} x DP {self.dp} x {ring}SP {self.sp} x "
            f"TP {self.tp}"
        )


def rank_layout(
    world_size: int, tp: int = 1, pp: int = 1, sp: int = 1, cp: int = 1
) -> dict[str, list[list[int]]]:
    """Rank lists of every group kind, as a pure function (no processes needed).

    Keys: ``tp``, ``sp`` (Ulysses), ``cp`` (ring), ``dp``, ``pp``, ``seq`` (context x
    sequence: one sequence's shards), ``sdp`` (data x context x sequence) and ``mp``
    (tensor x pipeline).
    """
    dims = ParallelDims(world_size, tp=tp, pp=pp, sp=sp, cp=cp)
    shape = dims.mesh_shape

    def rank_of(c: tuple[int, int, int, int, int]) -> int:
        p, d, x, s, t = c
        return (((p * dims.dp + d) * dims.cp + x) * dims.sp + s) * dims.tp + t

    def groups_over(varying: tuple[int, ...]) -> list[list[int]]:
        fixed = [i for i in range(5) if i not in varying]
        out = []
        for fixed_c in itertools.product(*(range(shape[i]) for i in fixed)):
            group = []
            for var_c in itertools.product(*(range(shape[i]) for i in varying)):
                c = [0] * 5
                for i, v in zip(fixed, fixed_c):
                    c[i] = v
                for i, v in zip(varying, var_c):
                    c[i] = v
                group.append(rank_of(tuple(c)))
            out.append(sorted(group))
        return sorted(out)

    return {
        "pp": groups_over((0,)),
        "dp": groups_over((1,)),
        "cp": groups_over((2,)),
        "sp": groups_over((3,)),
        "tp": groups_over((4,)),
        "seq": groups_over((2, 3)),
        "sdp": groups_over((1, 2, 3)),
        "mp": groups_over((0, 4)),
    }


class ParallelState:
    """Process groups of one run, built from a DeviceMesh ``(pp, dp, cp, sp, tp)``."""

    def __init__(self, dims: ParallelDims, device_type: str) -> None:
        if dist.get_world_size() != dims.world_size:
            raise UsageError(
                f"parallel layout {dims.describe()} does not match the {dist.get_world_size()} "
                "launched processes"
            )
        self.dims = dims
        self.mesh: DeviceMesh = init_device_mesh(
            device_type, dims.mesh_shape, mesh_dim_names=MESH_DIMS
        )
        self.sdp_mesh: DeviceMesh = self.mesh["dp", "cp", "sp"]._flatten("dp_cp_sp")
        self.seq_mesh: DeviceMesh = self.mesh["cp", "sp"]._flatten("cp_sp")
        self.dp_cp_group = self.mesh["dp", "cp"]._flatten("dp_cp").get_group()
        self.tp_group = self.mesh.get_group("tp")
        self.pp_group = self.mesh.get_group("pp")
        self.sp_group = self.mesh.get_group("sp")
        self.cp_group = self.mesh.get_group("cp")
        self.dp_group = self.mesh.get_group("dp")
        self.sdp_group = self.sdp_mesh.get_group()
        self.seq_group = self.seq_mesh.get_group()
        coords = self.mesh.get_coordinate()
        self.pp_rank, self.dp_rank, self.cp_rank, self.sp_rank, self.tp_rank = coords

    @property
    def seq_rank(self) -> int:
        """Position of this rank's shard in the (load-balanced) sequence: ring-major."""
        return self.cp_rank * self.dims.sp + self.sp_rank

    @property
    def sdp_rank(self) -> int:
        return self.dp_rank * self.dims.seq + self.seq_rank

    @property
    def sp_src_rank(self) -> int:
        """Global rank of the first process of this rank's SP group."""
        return (dist.get_rank() // (self.dims.sp * self.dims.tp)) * self.dims.sp * self.dims.tp


_STATE: ParallelState | None = None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    sequence_parallel_size: int = 1,
    device_type: str | None = None,
    context_parallel_size: int = 1,
) -> ParallelState:
    """Build the process groups of this run (requires torch.distributed to be initialised)."""
    global _STATE
    if not dist.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel needs torch.distributed.init_process_group first"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    dims = ParallelDims(
        dist.get_world_size(),
        tp=tensor_model_parallel_size,
        pp=pipeline_model_parallel_size,
        sp=sequence_parallel_size,
        cp=context_parallel_size,
    )
    _STATE = ParallelState(dims, device_type)
    return _STATE


def model_parallel_is_initialized() -> bool:
    return _STATE is not None


def get_parallel_state() -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            "parallel state is not initialised: call initialize_model_parallel first"
        )
    return _STATE


def destroy_model_parallel() -> None:
    """Forget the parallel state (the groups die with the default process group)."""
    global _STATE
    _STATE = None


# Megatron's getters: thin accessors over the one ParallelState.
def get_sequence_parallel_group() -> dist.ProcessGroup:
    return get_parallel_state().sp_group


def get_sequence_parallel_world_size() -> int:
    return get_parallel_state().dims.sp if _STATE is not None else 1


def get_sequence_parallel_rank() -> int:
    return get_parallel_state().sp_rank if _STATE is not None else 0


def get_sequence_parallel_src_rank() -> int:
    return get_parallel_state().sp_src_rank


def get_sequence_data_parallel_group() -> dist.ProcessGroup:
    return get_parallel_state().sdp_group


def get_sequence_data_parallel_world_size() -> int:
    return get_parallel_state().dims.seq * get_parallel_state().dims.dp if _STATE is not None else 1


def get_sequence_data_parallel_rank() -> int:
    return get_parallel_state().sdp_rank if _STATE is not None else 0


def get_context_parallel_group() -> dist.ProcessGroup:
    """The ring (context-parallel) group: ranks holding other chunk pairs of one sequence."""
    return get_parallel_state().cp_group


def get_context_parallel_world_size() -> int:
    return get_parallel_state().dims.cp if _STATE is not None else 1


def get_context_parallel_rank() -> int:
    return get_parallel_state().cp_rank if _STATE is not None else 0


def get_context_parallel_global_ranks() -> list[int]:
    return dist.get_process_group_ranks(get_parallel_state().cp_group)


def get_sequence_and_context_parallel_group() -> dist.ProcessGroup:
    """All ranks of one sequence (Ulysses x ring): the loss is averaged over them."""
    return get_parallel_state().seq_group


def get_sequence_and_context_parallel_world_size() -> int:
    return get_parallel_state().dims.seq if _STATE is not None else 1


def get_sequence_and_context_parallel_rank() -> int:
    return get_parallel_state().seq_rank if _STATE is not None else 0


def get_data_parallel_group(with_context_parallel: bool = False) -> dist.ProcessGroup:
    """The data-parallel group; ``with_context_parallel`` (Megatron's keyword): data x ring."""
    state = get_parallel_state()
    return state.dp_cp_group if with_context_parallel else state.dp_group


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    if _STATE is None:
        return 1
    return _STATE.dims.dp * (_STATE.dims.cp if with_context_parallel else 1)


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    if _STATE is None:
        return 0
    if with_context_parallel:
        return _STATE.dp_rank * _STATE.dims.cp + _STATE.cp_rank
    return _STATE.dp_rank


def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return get_parallel_state().tp_group


def get_tensor_model_parallel_world_size() -> int:
    return get_parallel_state().dims.tp if _STATE is not None else 1


def get_tensor_model_parallel_rank() -> int:
    return get_parallel_state().tp_rank if _STATE is not None else 0


def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return get_parallel_state().pp_group


def get_pipeline_model_parallel_world_size() -> int:
    return get_parallel_state().dims.pp if _STATE is not None else 1


def get_pipeline_model_parallel_rank() -> int:
    return get_parallel_state().pp_rank if _STATE is not None else 0


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1
