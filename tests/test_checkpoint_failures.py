"""Damaged checkpoints, clashing and failing saves: one line each, no checkpoint overwritten.

One tiny checkpoint (iterations 2 and 4 of 6) is trained per module; every case damages a
copy of it, runs pretrain_gpt.py on the session's one-rank world, and checks the exit code,
the single error line and that the bytes of every checkpoint that was there are unchanged.
"""

import contextlib
import hashlib
import io
import logging
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from dist_helper import get_world
from train_utils import TINY_TRAIN, run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUME = "--train-iters 6 --save-interval 2"
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("failures") / "ck")
    get_world(1).run(run_training, f"{RESUME} --save {path} --exit-interval 4")
    return path


def _copy(ckpt: str, dest) -> str:
    shutil.copytree(ckpt, dest)
    return str(dest)


def _digests(root: str) -> dict[str, str]:
    """sha256 of every file of every checkpoint directory under ``root``."""
    out = {}
    for name in sorted(os.listdir(root)):
        for base, _, files in os.walk(os.path.join(root, name)):
            for f in files:
                path = os.path.join(base, f)
                out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).digest()
    return {k: v for k, v in out.items() if k.startswith("iter_")}


# ---- run on the one-rank world ----
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _attempt(extra: str, base: str = TINY_TRAIN) -> tuple[int, str, list[float] | None, list[str]]:
    """(exit code, stderr, losses, log lines) of one training run."""
    err, log = io.StringIO(), _Lines()
    logging.getLogger("megatron").addHandler(log)
    try:
        with contextlib.redirect_stderr(err):
            return 0, err.getvalue(), run_training(extra, base), log.lines
    except SystemExit as e:
        return e.code, err.getvalue(), None, log.lines
    finally:
        logging.getLogger("megatron").removeHandler(log)


def _attempts(extras: list[str], base: str = TINY_TRAIN) -> list:
    return [_attempt(extra, base) for extra in extras]


def _run(*extras: str) -> list:
    return get_world(1).run(_attempts, list(extras))[0]


def assert_one_line(result, *names: str) -> str:
    code, err, _, _ = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "weights_only" not in lines[0]
    return lines[0]


# ---- never overwrite, always resume what exists ----
def test_missing_tracker_and_iter_directory_resume_without_overwriting(ckpt, tmp_path):
    a, b = _copy(ckpt, tmp_path / "a"), _copy(ckpt, tmp_path / "b")
    os.remove(os.path.join(a, "latest_checkpointed_iteration.txt"))
    os.symlink(b, tmp_path / "link")  # a checkpoint directory that is a symbolic link loads
    before = _digests(ckpt)
    no_tracker, clash, into_new, fresh, linked = _run(
        f"{RESUME} --load {a} --save {a}",
        f"{RESUME} --load {b}/iter_0000002 --save {b}",
        f"{RESUME} --load {b}/iter_0000002 --save {tmp_path}/new",
        f"{RESUME} --save {a}",
        f"{RESUME} --load {tmp_path}/link --save {tmp_path}/new2",
    )
    assert no_tracker[0] == 0 and len(no_tracker[2]) == 2
    assert any("resuming from the newest complete checkpoint" in x and "iter_0000004" in x
               for x in no_tracker[3])  # fmt: skip
    assert into_new[0] == 0 and len(into_new[2]) == 4
    assert any("is a checkpoint directory: loading it" in x for x in into_new[3])
    assert no_tracker[2] == into_new[2][2:] == linked[2]  # all resumed exactly
    assert_one_line(clash, f"--save {b}", "iterations 4,", "--load", "new --save")
    assert_one_line(fresh, f"--save {a}", "iterations 2, 4, 6,")  # 6: the first run above
    for root in (a, b):
        after = _digests(root)
        assert {k: after[k] for k in before} == before


def test_non_finite_losses_stop_without_saving_and_name_the_last_good_checkpoint(tmp_path):
    save = str(tmp_path / "nan")
    (stopped,) = _run(
        f"--train-iters 8 --lr 1e30 --min-lr 1e29 --lr-warmup-iters 0 --save {save} "
        "--save-interval 1 --max-nan-iterations 3"
    )  # one step at lr 1e30 ruins the weights: iterations 2.. are not finite
    line = assert_one_line(stopped, "iterations 2 to 4", f"--load {save}/iter_0000001 --save")
    assert "not finite: no checkpoint saved" in " ".join(stopped[3]) and "--lr" in line
    assert sorted(os.listdir(save)) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


# ---- damaged JSON files: one line naming the file ----
META_CASES = {
    "not utf-8": b"\xff\xfe{}",
    "not json": b"{iteration: 4",
    "a list": b"[4]",
    "no layout": None,
    "iteration abc": "abc",
    "iteration -7": -7,
    "iteration 1e30": 1e30,
}


def _damage_meta(path: str, case: str) -> None:
    import json

    meta_path = os.path.join(path, "iter_0000004", "meta.json")
    value = META_CASES[case]
    if isinstance(value, bytes):
        raw = value
    else:
        meta = json.load(open(meta_path))
        if case == "no layout":
            del meta["layout"]
        else:
            meta["iteration"] = value
        raw = json.dumps(meta).encode()
    with open(meta_path, "wb") as f:
        f.write(raw)


def _damage_rng(path: str, part: str) -> None:
    import json

    rng = os.path.join(path, "iter_0000004", "rng", "rank_00000.json")
    state = json.load(open(rng))
    if part == "torch":
        state["torch"] = [300] * len(state["torch"])
    elif part == "numpy":
        state["numpy"][1] = [-1] * 624
    else:
        state["python"][1] = [2**40] * 625
    json.dump(state, open(rng, "w"))


def test_damaged_json_files_are_one_line_each(ckpt, tmp_path):
    cases = []
    for i, case in enumerate(META_CASES):
        cases.append((_copy(ckpt, tmp_path / f"meta{i}"), "iter_0000004/meta.json"))
        _damage_meta(cases[-1][0], case)
    for part in ("torch", "numpy", "python"):
        cases.append((_copy(ckpt, tmp_path / f"rng_{part}"), "iter_0000004/rng/rank_00000.json"))
        _damage_rng(cases[-1][0], part)
    cases.append((_copy(ckpt, tmp_path / "tracker"), "latest_checkpointed_iteration.txt"))
    with open(os.path.join(cases[-1][0], "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("²")
    before = [_digests(path) for path, _ in cases]
    results = _run(*(f"{RESUME} --load {path} --save {path}" for path, _ in cases))
    for (path, name), result, digests in zip(cases, results, before):
        assert_one_line(result, os.path.join(path, name) if "/" in name else name)
        assert _digests(path) == digests


# ---- tensors: only from inside the checkpoint, failures named ----
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/megatron_pwned",))


def _rewrite_metadata(path: str, relative_path: str) -> None:
    from megatron.checkpointing.safety import SafeFileSystemReader

    metadata = SafeFileSystemReader(path).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = relative_path
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(metadata, f)


def test_data_outside_or_damaged_is_refused_with_one_line(ckpt, tmp_path):
    paths, names = [], []

    def case(name: str) -> str:
        paths.append(_copy(ckpt, tmp_path / name))
        return os.path.join(paths[-1], "iter_0000004")

    it4 = case("escape")
    data = sorted(f for f in os.listdir(it4) if f.endswith(".distcp"))
    os.makedirs(tmp_path / "elsewhere")
    shutil.copy(os.path.join(it4, data[0]), tmp_path / "elsewhere" / "x.distcp")
    _rewrite_metadata(it4, "../../../elsewhere/x.distcp")  # a loadable copy, outside
    names.append(".metadata")
    _rewrite_metadata(case("passwd"), "/etc/passwd")
    names.append(".metadata")
    link = os.path.join(case("link"), data[0])
    os.remove(link)
    os.symlink(tmp_path / "elsewhere" / "x.distcp", link)
    names.append(f"{link}: a symbolic link")
    for kind in ("garbled", "pickle"):
        file = os.path.join(case(kind), data[0])
        size = os.path.getsize(file)
        payload = os.urandom(size) if kind == "garbled" else pickle.dumps(_Evil())
        with open(file, "wb") as f:
            f.write(payload.ljust(size, b"\0"))
        names.append(file)
    for bad in (
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nNope\nq\x00.",
        b"cno_such_module\nx\n.",
    ):
        with open(os.path.join(case(f"global{len(paths)}"), ".metadata"), "wb") as f:
            f.write(bad)
        names.append(".metadata")
    before = [_digests(p) for p in paths]
    results = _run(*(f"{RESUME} --load {p} --save {p}" for p in paths))
    for path, name, result, digests in zip(paths, names, results, before):
        assert_one_line(result, name)
        assert _digests(path) == digests
    assert not os.path.exists("/tmp/megatron_pwned")
    # The HF export reads through the same reader: the garbled file, named in one line.
    from test_hf_conversion import checkpoint_convert

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = checkpoint_convert.main(["export", "--load", paths[3], "--output", f"{tmp_path}/hf"])
    assert_one_line((code, err.getvalue(), None, []), names[3])


def test_refused_global_imports_nothing(tmp_path):
    from megatron.checkpointing.safety import SafeFileSystemReader
    from megatron.errors import UsageError

    assert "torchgen.gen" not in sys.modules
    (tmp_path / ".metadata").write_bytes(b"ctorchgen.gen\nFileManager\n.")
    modules = set(sys.modules)
    with pytest.raises(UsageError, match="torchgen.gen.FileManager is not allowed"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert set(sys.modules) == modules


# ---- saving: --save checked at start-up, a full disk is one line ----
def test_unwritable_save_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    (result,) = _run(f"{RESUME} --save {tmp_path}/file/ck")
    assert_one_line(result, f"--save {tmp_path}/file/ck", "cannot write there")
    assert result[3] == [] or not any(" iteration " in x for x in result[3])


@pytest.mark.parametrize("limit", [200_000, 204_800])  # an error at the limit; a short write
def test_disk_full_at_save_keeps_the_previous_checkpoint(ckpt, tmp_path, limit):
    path = _copy(ckpt, tmp_path / "ck")
    before = _digests(path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "pretrain_gpt.py", *TINY_TRAIN.split(), *RESUME.split(),
           "--load", path, "--save", path]  # fmt: skip

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size,
    )  # fmt: skip
    line = assert_one_line((out.returncode, out.stderr, None, []), f"--save {path}", "iteration 6")
    assert "file size limit" in line and f"resume with --load {path}" in line
    assert _digests(path) == before
    assert sorted(os.listdir(path)) == ["iter_0000002", "iter_0000004", TRACKER]
    assert open(os.path.join(path, TRACKER)).read() == "4"
