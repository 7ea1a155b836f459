"""The benchmark suite on CPU: every script's --help, no imports between scripts except
``common``, and the A/B helper's verdicts on a fake benchmark in a throwaway repository."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import ab_compare  # noqa: E402

SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")

# Prints (and with an argument, writes as JSON) value.txt's number plus a noise term that
# cycles through NOISE, counted per worktree: base 100 gives runs 100 101 99 102 98.
FAKE_BENCH = """import json, pathlib, sys
root = pathlib.Path(__file__).parent
count = root / ".count"
i = int(count.read_text()) if count.exists() else 0
count.write_text(str(i + 1))
v = float((root / "value.txt").read_text()) + [0, 1, -1, 2, -2][i % 5]
print(f"time: {v} ms")
if len(sys.argv) > 1:
    pathlib.Path(sys.argv[1]).write_text(json.dumps({"results": [{"ms": v}]}))
"""


# One process imports torch once and runs each script as __main__ with --help.
HELP_ALL = """import contextlib, io, os, runpy, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as `python benchmarks/X.py` has it
for path in sys.argv[1:]:
    sys.argv, out = [path, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None) or "usage:" not in out.getvalue():
            raise SystemExit(f"{path} --help exited {stop.code}: {out.getvalue()}")
    else:
        raise SystemExit(f"{path} --help did not exit")
"""


def test_help_of_every_script():
    done = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *map(str, SCRIPTS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_scripts_import_only_common():
    names = {p.stem for p in BENCH.glob("*.py")}
    for path in SCRIPTS + [BENCH / "common.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module.split(".")[0]]
            else:
                continue
            bad = [m for m in mods if m in names and m != "common"]
            assert not bad, f"{path.name} imports {bad}: share code through common.py"


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def fake_repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("ab_repo")
    _git(repo, "init", "-q")
    (repo / "bench.py").write_text(FAKE_BENCH)
    (repo / ".gitignore").write_text(".count\n")
    commits = {}
    for name, value in (("base", 100), ("same", 100.5), ("faster", 90), ("slower", 110)):
        (repo / "value.txt").write_text(str(value))
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", name)
        commits[name] = _git(repo, "rev-parse", "HEAD")
    return repo, commits


@pytest.mark.parametrize(
    "head, verdict, percent",
    [("same", "no change", 0.5), ("faster", "faster", 10.0), ("slower", "slower", 10.0)],
)
def test_ab_verdicts(fake_repo, head, verdict, percent):
    repo, commits = fake_repo
    lines: list[str] = []
    result = ab_compare(
        [sys.executable, "bench.py"], commits["base"], commits[head], repo,
        metric=r"time: ([0-9.]+) ms", log=lines.append,
    )  # fmt: skip
    assert result.base_values == [100, 101, 99, 102, 98]
    assert len(result.head_values) == 5 and len(lines) == 10
    assert lines[0].split()[2] == "A" and lines[1].split()[2] == "B"  # interleaved A B A B
    assert result.verdict == verdict
    assert result.change_percent == pytest.approx(percent)
    report = result.report()
    assert f"verdict: {verdict}" in report
    assert ("do not re-run" in report) == (verdict == "no change")
    assert _git(repo, "worktree", "list").count("\n") == 0  # the worktrees are gone


def test_ab_cli_json_key_and_failures(fake_repo, tmp_path):
    repo, commits = fake_repo
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(BENCH / "ab.py"), "--repo", str(repo), "--pairs", "2",
           "--base", commits["base"], "--head", commits["faster"], "--higher-is-better",
           "--json-key", "results.0.ms", "--json", str(out), "--", sys.executable, "bench.py",
           "{json}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "verdict: slower by 10.0%" in done.stdout  # higher is better: 90 < 100
    saved = json.loads(out.read_text())
    assert saved["base_values"] == [100, 101] and saved["verdict"] == "slower"
    with pytest.raises(RuntimeError, match="exited 3"):
        ab_compare([sys.executable, "-c", "raise SystemExit(3)"], "HEAD", "HEAD", repo,
                   pairs=1, metric="x")  # fmt: skip
    with pytest.raises(ValueError, match="no match"):
        ab_compare([sys.executable, "bench.py"], "HEAD", "HEAD", repo, pairs=1, metric="nope")


def test_attention_kernel_table_cpu_smoke(tmp_path):
    """bench_attention_kernels.py's code path on CPU (Triton interpreter, tiny sizes)."""
    out = tmp_path / "kernels.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_attention_kernels.py"), "--cpu-smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["results"]
    got = {(r["mask"], r["method"]) for r in rows if "error" not in r}
    assert got == {
        ("causal", "triton"), ("causal", "triton-fused-dq"), ("documents", "triton"),
        ("documents", "triton-fused-dq"), ("documents", "doc-loop"),
    }  # fmt: skip
    assert all(r["err_vs_first"] < 1e-4 for r in rows)


def test_ring_one_gpu_cpu_smoke(tmp_path):
    """The one-GPU ring benchmark's code path on tiny CPU shapes: every ring rank's steps
    give the single call's output, --profile adds the top kernels, and --out writes JSON and
    markdown."""
    out = tmp_path / "ring.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_ring_one_gpu.py"), "--cpu-smoke", "--profile",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["ring"] for r in results] == [2, 4]
    assert all(r["max_rel_diff"] < 1e-5 for r in results)
    assert all(r["profile_ring"] and r["profile_single"] for r in results)  # --profile
    assert "| seq | R |" in out.with_suffix(".md").read_text()


def test_peak_blocks_replays_the_allocator_history():
    """--memory-peak's replay: the peak is the highest allocated total (a block counts until
    its free is requested, as the allocator's statistics count it), the blocks alive then are
    named by the innermost frame under the repository (no frame: autograd), frees of blocks
    from before the history are ignored, and ``start`` looks only at the later peak."""
    from common import peak_blocks

    root = "/repo/"
    mine = [{"filename": "/usr/torch/x.py", "line": 1, "name": "op"},
            {"filename": "/repo/megatron/mlp.py", "line": 7, "name": "forward"}]  # fmt: skip
    trace = [
        {"action": "free_requested", "addr": 99, "size": 5},  # allocated before the history
        {"action": "alloc", "addr": 1, "size": 4 << 30, "frames": mine},
        {"action": "alloc", "addr": 2, "size": 2 << 30, "frames": []},
        {"action": "alloc", "addr": 3, "size": 1 << 30, "frames": mine},  # the peak: 7 GiB
        {"action": "free_requested", "addr": 2, "size": 2 << 30},  # no longer counted
        {"action": "free_completed", "addr": 2, "size": 2 << 30},
        {"action": "alloc", "addr": 4, "size": 1 << 30, "frames": mine},  # 6 GiB
    ]
    got = peak_blocks({"device_traces": [trace]}, 0, root)
    assert got["peak_gib"] == 7.0
    assert got["largest"] == [[4.0, "megatron/mlp.py:7 (forward)"], [2.0, "(autograd)"],
                              [1.0, "megatron/mlp.py:7 (forward)"]]  # fmt: skip
    assert got["by_where"] == [[5.0, 2, "megatron/mlp.py:7 (forward)"], [2.0, 1, "(autograd)"]]
    later = peak_blocks({"device_traces": [trace]}, 0, root, start=4)  # after the first peak
    assert later["peak_gib"] == 6.0 and [b for b, _ in later["largest"]] == [4.0, 1.0, 1.0]
