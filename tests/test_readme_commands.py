"""The launch-script commands in README.md run: each is executed with DRY_RUN=1."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if not line.startswith("#") and "bash examples_seq_parallel/" in line:
                if "quickstart.sh" not in line:  # run in full by tests/test_quickstart.py
                    commands.append(" ".join(line.split()))
    return commands


def test_readme_has_launch_recipes():
    assert len(_script_commands()) >= 4


@pytest.mark.parametrize("command", _script_commands())
def test_readme_launch_command_runs(command, tmp_path):
    env = dict(os.environ, DRY_RUN="1", GPUS_PER_NODE="4", PRECISION="bf16")
    env["OUTPUT_DIR"] = str(tmp_path / "out")
    command = command.replace("CHECKPOINT_PATH=ckpt", f"CHECKPOINT_PATH={tmp_path / 'ckpt'}")
    # the real-data recipe: stand-in files where the README names a user's own
    prefix = tmp_path / "corpus_text_document"
    for suffix in (".bin", ".idx"):
        prefix.with_name(prefix.name + suffix).write_bytes(b"")
    command = command.replace("/data/BookCorpusDataset_text_document", str(prefix))
    command = command.replace("gpt2-vocab.json", str(ROOT / "tests/data/gpt2/vocab.json"))
    command = command.replace("gpt2-merges.txt", str(ROOT / "tests/data/gpt2/merges.txt"))
    proc = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pretrain_gpt.py" in proc.stdout
