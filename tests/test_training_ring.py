"""pretrain_gpt with ring attention (alone, and with Ulysses) trains with the one-process
losses; a checkpoint of U2 x R2 resumes at U4, at R4 and on one process."""

import math

import pytest
from dist_helper import get_world
from train_utils import run_many, run_training

PACKED = "--reset-attention-mask --reset-position-ids --eod-mask-loss"
WORLD1 = ["", PACKED, "--seq-length 60"]
WORLD4 = [
    "--ds-sequence-parallel-size 2 --context-parallel-size 2",
    "--context-parallel-size 4 " + PACKED,
    "--context-parallel-size 2 --zero-stage 3",  # DP 2 x ring 2: ZeRO over DP x CP
    "--ds-sequence-parallel-size 2 --context-parallel-size 2 --zero-stage 1 "
    "--checkpoint-activations --loss-chunk-size 24 --use-flash-attn " + PACKED,
    # 60 tokens padded to 64 (2 x R x U = 8): the padding is out of the loss
    "--ds-sequence-parallel-size 2 --context-parallel-size 2 --seq-length 60",
]
REFERENCE = [0, 1, 0, 1, 2]  # which WORLD1 run each WORLD4 run must match


@pytest.fixture(scope="module")
def losses():
    return get_world(1).run(run_many, WORLD1)[0], get_world(4).run(run_many, WORLD4)


@pytest.mark.parametrize("i", range(len(WORLD4)), ids=lambda i: WORLD4[i])
def test_ring_matches_one_process(losses, i):
    ref_runs, world4 = losses
    ref = ref_runs[REFERENCE[i]]
    for rank_losses in world4:
        run = rank_losses[i]
        assert len(run) == len(ref) == 10 and all(math.isfinite(x) for x in ref)
        assert math.isclose(run[0], ref[0], rel_tol=1e-6), (run[0], ref[0])
        for a, b in zip(run, ref):
            assert math.isclose(a, b, rel_tol=1e-4), (run, ref)


BASE = "--train-iters 6 --save-interval 3"


def _save_then_resume(tmp, extra, resume):
    """Train 3 iterations with ``extra`` (save), then 3 more with ``resume`` from it."""
    first = run_training(f"{BASE} --exit-interval 3 --save {tmp}/ck {extra}") if extra else []
    if resume is None:
        return first
    return run_training(f"{BASE} --load {tmp}/ck {resume}")


def test_resume_across_layouts(tmp_path):
    """U2 x R2 saves at iteration 3; U4, R4 and one process resume it with the uninterrupted
    run's losses (the checkpoint's layout records the ring degree)."""
    import json

    (full,) = get_world(1).run(run_training, BASE)
    tmp = str(tmp_path)
    get_world(4).run(_save_then_resume, tmp, "--ds-sequence-parallel-size 2 "
                     "--context-parallel-size 2", None)  # fmt: skip
    with open(f"{tmp}/ck/iter_0000003/meta.json") as f:
        meta = json.load(f)
    assert meta["format_version"] == 2
    assert meta["layout"] == {"world_size": 4, "sp": 2, "cp": 2, "dp": 1}
    for layout in ("--ds-sequence-parallel-size 4", "--context-parallel-size 4"):
        for run in get_world(4).run(_save_then_resume, tmp, "", layout):
            assert run == pytest.approx(full[3:], rel=1e-4)
    (run,) = get_world(1).run(_save_then_resume, tmp, "", "")
    assert run == pytest.approx(full[3:], rel=1e-4)


def _meta(version, layout) -> bytes:
    import json

    meta = {"iteration": 3, "train_state": {}, "scheduler": {}, "args": {}, "param_groups": None}
    if version is not None:
        meta["format_version"] = version
    return json.dumps({**meta, "layout": layout}).encode()


def test_meta_validator_reads_both_formats():
    """Version 1 layouts (no ring degree) still load; version 2 needs "cp"; others refused."""
    from megatron.checkpointing.checks import parse_meta
    from megatron.errors import UsageError

    old = {"world_size": 2, "sp": 2, "dp": 1}
    assert parse_meta(_meta(1, old), "iter_0000003/meta.json")["layout"] == old
    assert parse_meta(_meta(None, old), "iter_0000003/meta.json")["layout"] == old
    new = {**old, "cp": 1}
    assert parse_meta(_meta(2, new), "iter_0000003/meta.json")["layout"] == new
    with pytest.raises(UsageError, match="lacks positive world_size, sp, dp, cp"):
        parse_meta(_meta(2, old), "iter_0000003/meta.json")
    with pytest.raises(UsageError, match="format_version 3"):
        parse_meta(_meta(3, new), "iter_0000003/meta.json")
