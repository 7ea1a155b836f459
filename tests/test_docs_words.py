"""The user-facing text speaks about the software, not about how it was produced.

Scans README.md, docs/*.md, benchmarks/*.md, benchmarks/results/*.md, the comment lines
of the example launch scripts and the ``--help`` text of the training entry point for
words that belong in a work log: numbered work periods ("the fifth session"), machine
availability ("lent", ``nvidia-h100-x4``), requirement labels ("(Must)", "Must:",
"Goal:"), "anchor" and tracker references ("issue 9"). The tests' own data files are
not scanned.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_ORDINALS = (
    r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|"
    r"thirteenth|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|"
    r"twentieth|last|previous|next|this|that|same|earlier|later|one|two|three|\d+(st|nd|rd|th)?"
)

FORBIDDEN = [
    ("numbered work period", re.compile(rf"\b({_ORDINALS})[- ]sessions?\b", re.I)),
    ("work period", re.compile(r"\bsessions?\b(?!\s*[\"']?\))", re.I)),
    ("machine availability", re.compile(r"\blent\b", re.I)),
    ("machine type name", re.compile(r"nvidia-h[0-9]+", re.I)),
    ("requirement label", re.compile(r"\(Must\)|\bMust:|\bGoal:")),
    ("internal reference name", re.compile(r"\banchor\b", re.I)),
    ("tracker reference", re.compile(r"\bissues? #?[0-9]+", re.I)),
]

# pytest's fixture scope is the one legitimate use of the word.
_ALLOWED = [re.compile(r"scope\s*=\s*[\"']session[\"']")]


def _hits(text: str) -> list[str]:
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        probe = line
        for allowed in _ALLOWED:
            probe = allowed.sub("", probe)
        for what, pattern in FORBIDDEN:
            m = pattern.search(probe)
            if m:
                found.append(f"{lineno}: {what}: {m.group(0)!r} in {line.strip()[:120]!r}")
    return found


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for pattern in ("docs/*.md", "benchmarks/*.md", "benchmarks/results/*.md"):
        files.extend(sorted(ROOT.glob(pattern)))
    return files


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_has_no_work_log_words(path: Path) -> None:
    hits = _hits(path.read_text(encoding="utf-8"))
    assert not hits, f"{path.relative_to(ROOT)}:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "examples_seq_parallel").glob("*.sh")),
    ids=lambda p: p.name,
)
def test_example_script_comments_have_no_work_log_words(path: Path) -> None:
    comments = "\n".join(
        line if line.lstrip().startswith("#") else ""
        for line in path.read_text(encoding="utf-8").splitlines()
    )
    hits = _hits(comments)
    assert not hits, f"{path.relative_to(ROOT)}:\n" + "\n".join(hits)


def test_help_text_has_no_work_log_words() -> None:
    from megatron.initialize.arguments import build_parser

    hits = _hits(build_parser().format_help())
    assert not hits, "pretrain_gpt.py --help:\n" + "\n".join(hits)


def test_the_scan_finds_what_it_should() -> None:
    bad = [
        "measured in the seventh session",
        "the 12th session",
        "no 4 x H100 machine was lent",
        "on nvidia-h100-x4",
        "(Must) keep it",
        "Must: keep it",
        "Goal: speed",
        "the anchor script",
        "see issue 9",
        "Issue #12 says",
        "between sessions",
    ]
    for text in bad:
        assert _hits(text), text
    good = [
        '@pytest.fixture(scope="session")',
        "the gradient anchors nothing",
        "an issue with the data",
        "a valid H100 run",
    ]
    for text in good:
        assert not _hits(text), text
