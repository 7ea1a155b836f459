"""The parsed arguments are written only while they are parsed and validated.

After ``validate_args`` the run reads frozen configs (ModelConfig, ParallelConfig,
TrainingConfig); a value that must be derived is derived during validation or in a config.
This scans ``megatron/`` for assignments to ``args.<name>`` (and ``setattr(args, ...)``)
outside the start-up modules, with the few exceptions below.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "megatron"
# Start-up: parsing, validation and the arguments read back from a checkpoint's meta.json
# (--use-checkpoint-args, before validation).
ALLOWED_FILES = {
    "initialize/arguments.py",
    "initialize/argument_checks.py",
    "initialize/deepspeed_config.py",  # --deepspeed_config, read during validation
    "initialize/long_context_args.py",  # the offload flags, checked during validation
    "initialize/initialize.py",
    "tokenizer/files.py",
}
# (file, function): Megatron's build_tokenizer sets args.padded_vocab_size, which forks read;
# load_args_from_checkpoint runs before validation; a save that prunes the checkpoint the
# tokenizer files were read from points those file flags at the newest copy.
ALLOWED_FUNCTIONS = {
    ("tokenizer/tokenizer.py", "build_tokenizer"),
    ("checkpointing/checkpointing.py", "load_args_from_checkpoint"),
    ("checkpointing/checkpointing.py", "_follow_tokenizer_copy"),
}


def _writes(tree: ast.AST):
    """(function name, line) of each ``args.x = ...`` / ``setattr(args, ...)``."""
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for el in ast.walk(t):
                    if (
                        isinstance(el, ast.Attribute)
                        and isinstance(el.value, ast.Name)
                        and el.value.id == "args"
                    ):
                        yield func.name, node.lineno
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "setattr"
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id == "args"
            ):
                yield func.name, node.lineno


def test_no_argument_written_after_validation():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED_FILES:
            continue
        for func, line in _writes(ast.parse(path.read_text(encoding="utf-8"))):
            if (rel, func) not in ALLOWED_FUNCTIONS:
                found.append(f"megatron/{rel}:{line} ({func})")
    assert not found, "arguments written after validation: " + ", ".join(found)
