"""The communication model of Ulysses x ring counts the bytes the code sends."""

import pytest

from megatron.planning.comm_model import ring_hides_transfer_from, sequence_comm_bytes

SHAPE = {"seq": 1024, "micro_batch": 1, "num_heads": 8, "head_dim": 16, "elem_bytes": 2}


def test_bytes_per_rank_per_layer():
    # Ulysses 4: Q/K/V (3 x 8 heads) and the output (8), forward and backward, 3/4 sent.
    u4 = sequence_comm_bytes(**SHAPE, num_kv_heads=8, sp=4, cp=1)
    assert u4["ring"] == 0 and u4["all_to_all"] == 2 * 0.75 * 256 * 2 * 32 * 16
    # Ring 4: the K/V block (256 tokens x 8 heads x 2) 3 hops forward and 3 in backward in
    # bf16, plus the fp32 dK/dV accumulator 4 hops.
    r4 = sequence_comm_bytes(**SHAPE, num_kv_heads=8, sp=1, cp=4)
    block = 2 * 256 * 8 * 16
    assert r4["all_to_all"] == 0 and r4["ring"] == (3 * 2 + 3 * 2 + 4 * 4) * block
    # GQA: the ring passes 2 K/V heads as they are; Ulysses 4 replicates them up to 4.
    gqa = sequence_comm_bytes(**SHAPE, num_kv_heads=2, sp=1, cp=4)
    assert gqa["ring"] == pytest.approx(r4["ring"] / 4)
    assert sequence_comm_bytes(**SHAPE, num_kv_heads=2, sp=4, cp=1)["all_to_all"] == (
        2 * 0.75 * 256 * 2 * (16 + 8) * 16
    )


def test_ring_hides_its_transfer_from_a_chunk_length():
    # 400 TFLOP/s over 50 GB/s, bf16, MHA: chunks of 8000 tokens; GQA 1/8: 1000.
    assert ring_hides_transfer_from(16, 16, 1, 400e12, 50e9) == pytest.approx(8000)
    assert ring_hides_transfer_from(32, 4, 1, 400e12, 50e9) == pytest.approx(1000)
