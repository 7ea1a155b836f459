"""The run's parsed arguments, set once at start-up (Megatron's ``get_args``)."""

from __future__ import annotations

import argparse

_ARGS: argparse.Namespace | None = None


def set_args(args: argparse.Namespace | None) -> None:
    global _ARGS
    _ARGS = args


def get_args() -> argparse.Namespace:
    if _ARGS is None:
        raise RuntimeError(
            "arguments are not set: call megatron.initialize.initialize_megatron first"
        )
    return _ARGS
