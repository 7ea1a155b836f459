"""pretrain_gpt with 6 heads over 4 SP ranks (2/2/1/1 heads each), and with a sequence
length that does not split over them (padded, out of the loss), trains with SP 1's losses."""

import math

import pytest
from dist_helper import get_world
from train_utils import TINY_TRAIN, run_many, run_training

SIX_HEADS = TINY_TRAIN.replace(
    "--hidden-size 64 --num-attention-heads 8", "--hidden-size 48 --num-attention-heads 6"
)
SEQ62 = " --seq-length 62 --max-position-embeddings 62"
LLAMA = " --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear --num-key-value-heads 2"
WORLD1 = ["", SEQ62, LLAMA + SEQ62]
WORLD4 = [
    "--ds-sequence-parallel-size 4",
    "--ds-sequence-parallel-size 4 --zero-stage 3 --checkpoint-activations --loss-chunk-size 24"
    + SEQ62,
    "--ds-sequence-parallel-size 4 --delay-wgrad-compute" + LLAMA + SEQ62,
]
REFERENCE = [0, 1, 2]  # the WORLD1 run each WORLD4 run must match


@pytest.fixture(scope="module")
def losses():
    one = get_world(1).run(run_many, [SIX_HEADS + " " + x for x in WORLD1])[0]
    four = get_world(4).run(run_many, [SIX_HEADS + " " + x for x in WORLD4])
    return one, four


@pytest.mark.parametrize("i", range(len(WORLD4)), ids=lambda i: WORLD4[i].strip())
def test_matches_sp1(losses, i):
    one, four = losses
    ref = one[REFERENCE[i]]
    assert len(ref) == 10 and all(math.isfinite(x) for x in ref)
    for rank_losses in four:
        run = rank_losses[i]
        assert math.isclose(run[0], ref[0], rel_tol=1e-6), (run[0], ref[0])
        for a, b in zip(run, ref):
            assert math.isclose(a, b, rel_tol=1e-4), (run, ref)


def _save_at_5(tmp):
    extra = " --ds-sequence-parallel-size 4 --zero-stage 3" + SEQ62
    return run_training(f"{SIX_HEADS}{extra} --save {tmp}/ck --save-interval 5 --exit-interval 5")


def _resume(tmp):
    return run_training(f"{SIX_HEADS}{SEQ62} --load {tmp}/ck")


def test_checkpoint_resumes_at_sp1(losses, tmp_path):
    """Saved at SP 4 (uneven heads, padded sequence, ZeRO 3), resumed at SP 1."""
    one, _ = losses
    get_world(4).run(_save_at_5, str(tmp_path))
    (resumed,) = get_world(1).run(_resume, str(tmp_path))
    assert len(resumed) == 5
    for a, b in zip(resumed, one[1][5:]):
        assert math.isclose(a, b, rel_tol=1e-4), (resumed, one[1])
