"""Rank layout as a pure function, and the DeviceMesh groups agree with it."""

import pytest
import torch.distributed as dist
from dist_helper import get_world

from megatron.core.parallel_state import rank_layout
from megatron.errors import UsageError


def test_layout_world8_sp2():
    lay = rank_layout(8, sp=2)
    assert lay["sp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # contiguous: SP stays inside a node
    assert lay["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # strided
    assert lay["sdp"] == [list(range(8))]
    assert lay["tp"] == [[r] for r in range(8)] and lay["pp"] == [[r] for r in range(8)]


def test_layout_world8_sp4():
    lay = rank_layout(8, sp=4)
    assert lay["sp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay["sdp"] == [list(range(8))]


def test_layout_with_tp_and_pp():
    lay = rank_layout(16, tp=2, pp=2, sp=2)
    assert lay["tp"][:2] == [[0, 1], [2, 3]]
    assert lay["sp"][:2] == [[0, 2], [1, 3]]
    assert lay["dp"][:2] == [[0, 4], [1, 5]]
    assert lay["pp"][0] == [0, 8]
    assert lay["sdp"][0] == [0, 2, 4, 6]


def test_layout_rejects_bad_world():
    with pytest.raises(UsageError, match="world size 6 is not divisible"):
        rank_layout(6, sp=4)


def _mesh_groups(sp):
    from megatron.core import mpu

    mpu.initialize_model_parallel(sequence_parallel_size=sp)
    out = {
        "sp": dist.get_process_group_ranks(mpu.get_sequence_parallel_group()),
        "dp": dist.get_process_group_ranks(mpu.get_data_parallel_group()),
        "sdp": dist.get_process_group_ranks(mpu.get_sequence_data_parallel_group()),
        "sp_rank": mpu.get_sequence_parallel_rank(),
        "dp_rank": mpu.get_data_parallel_rank(),
        "sdp_rank": mpu.get_sequence_data_parallel_rank(),
        "src": mpu.get_sequence_parallel_src_rank(),
        "sizes": (
            mpu.get_sequence_parallel_world_size(),
            mpu.get_data_parallel_world_size(),
            mpu.get_sequence_data_parallel_world_size(),
        ),
    }
    mpu.destroy_model_parallel()
    assert not mpu.model_parallel_is_initialized()
    return out


def test_mesh_matches_layout():
    results = get_world(4).run(_mesh_groups, 2)
    lay = rank_layout(4, sp=2)
    for rank, r in enumerate(results):
        assert sorted(r["sp"]) in lay["sp"] and rank in r["sp"]
        assert sorted(r["dp"]) in lay["dp"] and rank in r["dp"]
        assert sorted(r["sdp"]) == [0, 1, 2, 3]
        assert r["sp_rank"] == rank % 2 and r["dp_rank"] == rank // 2 and r["sdp_rank"] == rank
        assert r["src"] == rank - rank % 2
        assert r["sizes"] == (2, 2, 4)


def test_layout_with_ring():
    """World 16 = DP 2 x CP 2 x SP 4: Ulysses groups contiguous, rings strided by SP."""
    lay = rank_layout(16, sp=4, cp=2)
    assert lay["sp"][:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay["cp"][:2] == [[0, 4], [1, 5]]
    assert lay["dp"][:2] == [[0, 8], [1, 9]]
    assert lay["seq"] == [list(range(8)), list(range(8, 16))]
    assert lay["sdp"] == [list(range(16))]
    with pytest.raises(UsageError, match=r"context-parallel \(2\) = 8"):
        rank_layout(12, sp=4, cp=2)


def _cp_groups():
    from megatron.core import mpu

    state = mpu.initialize_model_parallel(sequence_parallel_size=1, context_parallel_size=2)
    return {
        "cp": dist.get_process_group_ranks(mpu.get_context_parallel_group()),
        "cp_ranks": mpu.get_context_parallel_global_ranks(),
        "cp_rank": mpu.get_context_parallel_rank(),
        "cp_size": mpu.get_context_parallel_world_size(),
        "seq": dist.get_process_group_ranks(mpu.get_sequence_and_context_parallel_group()),
        "dp_cp": dist.get_process_group_ranks(mpu.get_data_parallel_group(True)),
        "dp_cp_size": mpu.get_data_parallel_world_size(with_context_parallel=True),
        "dp_cp_rank": mpu.get_data_parallel_rank(with_context_parallel=True),
        "seq_rank": state.seq_rank,
        "sdp_size": mpu.get_sequence_data_parallel_world_size(),
    }


def test_context_parallel_getters():
    for rank, r in enumerate(get_world(4).run(_cp_groups)):
        assert r["cp"] == r["cp_ranks"] == r["seq"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert r["cp_rank"] == r["seq_rank"] == rank % 2 and r["cp_size"] == 2
        assert r["dp_cp"] == [0, 1, 2, 3] and r["dp_cp_size"] == 4 and r["dp_cp_rank"] == rank
        assert r["sdp_size"] == 4
