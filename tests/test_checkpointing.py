"""Exact resume, resume on another layout, atomic saves and safe loading."""

import os
import pickle

import pytest
import torch
from dist_helper import get_world
from train_utils import run_training

from megatron.errors import UsageError

DROPOUT_ON = "--hidden-dropout 0.1 --attention-dropout 0.1"


def _exact_resume(tmp):
    """Uninterrupted 20 iterations vs. stop at 10 + resume to 20 (same layout, dropout on)."""
    base = f"--train-iters 20 --ds-sequence-parallel-size 2 {DROPOUT_ON}"
    full = run_training(base)
    run_training(f"{base} --save {tmp}/ck --save-interval 10 --exit-interval 10")
    resumed = run_training(f"{base} --load {tmp}/ck --save {tmp}/ck --save-interval 10")
    # Loading the finished run again (a torchrun restart after the last save): nothing to do.
    again = run_training(f"{base} --load {tmp}/ck --save {tmp}/ck --save-interval 10")
    return full, resumed, again


def test_exact_resume(tmp_path):
    for full, resumed, again in get_world(2).run(_exact_resume, str(tmp_path)):
        assert len(full) == 20 and len(resumed) == 10
        assert resumed == full[10:]  # bitwise
        assert again == []


def _save_world4(tmp):
    base = "--train-iters 12 --ds-sequence-parallel-size 2 --zero-stage 3"
    full = run_training(base)
    run_training(f"{base} --save {tmp}/ck4 --save-interval 6 --exit-interval 6")
    return full


def _resume_other_layout(tmp, extra):
    return run_training(f"--train-iters 12 --load {tmp}/ck4 {extra}")


def assert_close_run(run, ref):
    assert len(run) == len(ref)
    assert abs(run[0] - ref[0]) <= 1e-6 * abs(ref[0])
    for a, b in zip(run, ref):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_resume_on_another_layout(tmp_path):
    full = get_world(4).run(_save_world4, str(tmp_path))[0]
    # World 2 (SP 2, ZeRO 0) and world 1, same global batch, no conversion step.
    for run in get_world(2).run(
        _resume_other_layout, str(tmp_path), "--ds-sequence-parallel-size 2 --zero-stage 0"
    ):
        assert_close_run(run, full[6:])
    (run1,) = get_world(1).run(_resume_other_layout, str(tmp_path), "")
    assert_close_run(run1, full[6:])


# ---- atomicity and safety: single process, no training needed ----
def _make_checkpoint(tmp, iters=4, interval=2, extra=""):
    run_training(f"--train-iters {iters} --save {tmp}/ck --save-interval {interval} {extra}")
    return f"{tmp}/ck"


def _half_written_and_truncated(tmp):
    from megatron.checkpointing import checkpointing
    from megatron.checkpointing.checkpointing import find_checkpoint

    root = _make_checkpoint(tmp)
    # A save that crashed half-way leaves only an .inprogress directory: never loaded.
    os.makedirs(os.path.join(root, "iter_0000006.inprogress", "rng"))
    results = {"complete": find_checkpoint(root)}
    # A crash after the tracker moved but before meta.json: fall back to iteration 2.
    os.remove(os.path.join(root, "iter_0000004", "meta.json"))
    results["fallback"] = find_checkpoint(root)
    # Keep-last-N never removes anything before the newer checkpoint is complete.
    results["kept"] = sorted(os.listdir(root))
    # A truncated data file is named in the error.
    path = os.path.join(root, "iter_0000002")
    data = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
    with open(os.path.join(path, data), "r+b") as f:
        f.truncate(10)
    try:
        run_training(f"--train-iters 6 --load {root}")
        results["truncated"] = None
    except SystemExit as e:
        results["truncated"] = f"exit {e.code}"
    except UsageError as e:
        results["truncated"] = str(e)
    results["checkpointing_module"] = checkpointing.TRACKER
    return results


def test_half_written_checkpoint_is_skipped_and_truncated_file_named(tmp_path, capsys):
    (r,) = get_world(1).run(_half_written_and_truncated, str(tmp_path))
    assert r["complete"].endswith("iter_0000004")
    assert r["fallback"].endswith("iter_0000002")
    assert "iter_0000002" in r["kept"] and "latest_checkpointed_iteration.txt" in r["kept"]
    assert r["truncated"] is not None and (
        "truncated checkpoint data file" in r["truncated"] or r["truncated"] == "exit 2"
    )


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/megatron_pwned",))


def test_malicious_metadata_is_refused(tmp_path):
    from megatron.checkpointing.safety import SafeFileSystemReader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UsageError, match="refused to load checkpoint metadata"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not os.path.exists("/tmp/megatron_pwned")


def test_malicious_non_tensor_item_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron.checkpointing.safety import SafeFileSystemReader, SafeLoadPlanner

    dcp.save({"w": torch.ones(2), "extra": _Evil()}, checkpoint_id=str(tmp_path), no_dist=True)
    target = {"w": torch.zeros(2), "extra": None}
    with pytest.raises((UsageError, CheckpointException), match="refused to unpickle"):
        dcp.load(
            target,
            storage_reader=SafeFileSystemReader(str(tmp_path)),
            planner=SafeLoadPlanner(),
            no_dist=True,
        )
    assert not os.path.exists("/tmp/megatron_pwned")
    # A plain tensor checkpoint loads through the same safe path.
    dcp.save({"w": torch.full((2,), 3.0)}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    ok = {"w": torch.zeros(2)}
    dcp.load(
        ok,
        storage_reader=SafeFileSystemReader(str(tmp_path / "ok")),
        planner=SafeLoadPlanner(),
        no_dist=True,
    )
    assert ok["w"].tolist() == [3.0, 3.0]


def _flag_behaviour(tmp):
    out = {}
    # Keep only the newest 2 complete checkpoints.
    run_training(f"--train-iters 8 --save {tmp}/keep --save-interval 2 --keep-last-n-checkpoints 2")
    out["kept"] = sorted(n for n in os.listdir(f"{tmp}/keep") if n.startswith("iter_"))
    # --finetune: weights only, iteration restarts at 0 (so 8 more iterations run).
    out["finetune"] = len(run_training(f"--train-iters 8 --load {tmp}/keep --finetune"))
    # Resuming continues from iteration 8 of 12.
    out["resume"] = len(
        run_training(f"--train-iters 12 --use-checkpoint-opt_param-scheduler --load {tmp}/keep")
    )
    # --use-checkpoint-args takes the model shape from the checkpoint (here: 3 layers).
    run_training(f"--train-iters 4 --num-layers 3 --save {tmp}/three --save-interval 4")
    try:
        out["ckpt_args"] = len(
            run_training(
                f"--train-iters 6 --load {tmp}/three --use-checkpoint-args --use-checkpoint-opt_param-scheduler"
            )
        )
    except SystemExit as e:
        out["ckpt_args"] = f"exit {e.code}"
    # --exit-on-missing-checkpoint with nothing to load is an error, not a silent fresh start.
    try:
        run_training(f"--train-iters 2 --load {tmp}/nothing --exit-on-missing-checkpoint")
        out["missing"] = "trained"
    except SystemExit as e:
        out["missing"] = e.code
    return out


def test_checkpoint_flags(tmp_path):
    (r,) = get_world(1).run(_flag_behaviour, str(tmp_path))
    assert r["kept"] == ["iter_0000006", "iter_0000008"]
    assert r["finetune"] == 8 and r["resume"] == 4
    assert r["ckpt_args"] == 2
    assert r["missing"] == 2
