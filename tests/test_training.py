"""A run's losses do not depend on how the work is split (SP, DP, ZeRO stage)."""

import math

import pytest
from dist_helper import get_world
from train_utils import run_many

WORLD1 = ["", "--micro-batch-size 1"]
WORLD2 = [
    "--ds-sequence-parallel-size 2",
    "",  # DP 2: one micro-batch each instead of two accumulated
    "--ds-sequence-parallel-size 2 --zero-stage 1",
    "--zero-stage 2",
    "--ds-sequence-parallel-size 2 --zero-stage 3",
    "--zero-stage 3 --checkpoint-activations",
    "--ds-sequence-parallel-size 2 --sp-overlap-chunks 2 --checkpoint-activations",
    "--ds-sequence-parallel-size 2 --zero-stage 3 --torch-compile --checkpoint-activations",
    "--ds-sequence-parallel-size 2 --zero-stage 3 --checkpoint-activations --checkpoint-in-cpu",
]
WORLD4 = [
    "--ds-sequence-parallel-size 2",
    "--ds-sequence-parallel-size 2 --zero-stage 3",
    "--ds-sequence-parallel-size 4",
]


@pytest.fixture(scope="module")
def losses():
    out = {}
    out[1] = get_world(1).run(run_many, WORLD1)[0]
    out[2] = get_world(2).run(run_many, WORLD2)
    out[4] = get_world(4).run(run_many, WORLD4)
    return out


def assert_same_losses(run, ref):
    assert len(run) == len(ref) == 10
    assert math.isclose(run[0], ref[0], rel_tol=1e-6), (run[0], ref[0])
    for a, b in zip(run, ref):
        assert math.isclose(a, b, rel_tol=1e-4), (run, ref)


def test_accumulation_matches(losses):
    ref = losses[1][0]
    assert all(math.isfinite(x) for x in ref)
    # Accumulating 4 micro-batches of 1 equals 2 micro-batches of 2.
    assert_same_losses(losses[1][1], ref)


@pytest.mark.parametrize("i", range(len(WORLD2)), ids=lambda i: WORLD2[i] or "dp2")
def test_world2_matches_world1(losses, i):
    for rank_losses in losses[2]:
        assert_same_losses(rank_losses[i], losses[1][0])


@pytest.mark.parametrize("i", range(len(WORLD4)), ids=lambda i: WORLD4[i])
def test_world4_matches_world1(losses, i):
    for rank_losses in losses[4]:
        assert_same_losses(rank_losses[i], losses[1][0])
