#!/usr/bin/env python
"""Build a small real-text corpus from the docstrings of the Python standard library.

Every machine that runs this project has the stdlib sources, so the quickstart needs no
download: walk them with :mod:`ast`, keep module/class/function docstrings, and write one
JSON object per docstring (``{"text": ...}``) for ``tools/preprocess_data.py``. A plain-text
copy (one docstring per line) is written too for training the SentencePiece tokenizer.

Example::

    python examples_seq_parallel/build_docstring_corpus.py --output work/docstrings.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

# Tests and IDE sources are noisy (fixtures, binary blobs); site-packages is not the stdlib.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_files(root: str) -> Iterator[str]:
    """The stdlib's ``.py`` files under ``root``, in a fixed (sorted) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def docstrings(path: str, min_chars: int) -> Iterator[str]:
    """Docstrings of at least ``min_chars`` characters in one source file (none if unparsable)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, DOC_NODES):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def build_corpus(
    output: str, text_output: str | None, max_mb: float, min_chars: int, root: str
) -> tuple[int, int]:
    """Write the JSONL (and the plain-text copy); return (documents, characters)."""
    limit = int(max_mb * 1e6) if max_mb > 0 else None
    docs = chars = 0
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    text_f = open(text_output + ".tmp", "w", encoding="utf-8") if text_output else None
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for path in stdlib_files(root):
                for doc in docstrings(path, min_chars):
                    out.write(json.dumps({"text": doc}) + "\n")
                    if text_f is not None:
                        text_f.write(" ".join(doc.split()) + "\n")
                    docs += 1
                    chars += len(doc)
                if limit is not None and chars >= limit:
                    break
    finally:
        if text_f is not None:
            text_f.close()
    # Rename last so that a half-written corpus is never mistaken for a finished one.
    if text_output:
        os.replace(text_output + ".tmp", text_output)
    os.replace(tmp, output)
    return docs, chars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument(
        "--text-output", default=None, help="also write one docstring per line here"
    )
    parser.add_argument(
        "--max-mb", type=float, default=0.0, help="stop after about this many MB (0: no limit)"
    )
    parser.add_argument("--min-chars", type=int, default=40, help="skip shorter docstrings")
    parser.add_argument(
        "--stdlib",
        default=sysconfig.get_paths()["stdlib"],
        help="standard-library directory to walk (default: this interpreter's)",
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.stdlib):
        print(f"error: --stdlib {args.stdlib}: no such directory", file=sys.stderr)
        return 2
    docs, chars = build_corpus(
        args.output, args.text_output, args.max_mb, args.min_chars, args.stdlib
    )
    if docs == 0:
        print(f"error: --stdlib {args.stdlib}: no docstrings found", file=sys.stderr)
        return 2
    print(f"wrote {docs} docstrings ({chars / 1e6:.1f} MB of text) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
