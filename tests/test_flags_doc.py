"""docs/flags.md is what tools/gen_flags_doc.py makes from the current argument parser."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_flags_doc", ROOT / "tools" / "gen_flags_doc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_doc_is_up_to_date():
    text = _generator().render()
    current = (ROOT / "docs" / "flags.md").read_text(encoding="utf-8")
    assert current == text, "docs/flags.md is out of date: run python tools/gen_flags_doc.py"


def test_flags_doc_lists_every_compat_flag_and_one_line_per_flag():
    from megatron.initialize.arguments import COMPAT_ONLY, build_parser

    text = _generator().render()
    parser = build_parser()
    for action in parser._actions:
        if action.dest in COMPAT_ONLY:
            assert f"`{action.option_strings[0]}`" in text
    for line in text.splitlines():
        if line.startswith("- `--"):
            assert len(line) < 400, line
