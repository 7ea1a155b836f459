"""Deterministic faults for tests, driven by the MEGATRON_FAULT environment variable.

``MEGATRON_FAULT="nan_grad@3"`` puts a NaN into a gradient at iteration 3 (1-based),
``"nan_grad@3-5"`` at iterations 3 to 5;
``MEGATRON_FAULT="kill@1:4"`` kills rank 1 at iteration 4, only in the first torchrun
attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restarted job runs through.
"""

from __future__ import annotations

import os

import torch


def _spec() -> tuple[str, str] | None:
    value = os.environ.get("MEGATRON_FAULT", "")
    if "@" not in value:
        return None
    kind, where = value.split("@", 1)
    return kind, where


def maybe_poison_grads(model: torch.nn.Module, iteration: int) -> None:
    spec = _spec()
    if not spec or spec[0] != "nan_grad":
        return
    first, _, last = spec[1].partition("-")
    if int(first) <= iteration <= int(last or first):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
                return


def maybe_kill(rank: int, iteration: int) -> None:
    spec = _spec()
    if not spec or spec[0] != "kill" or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kill_rank, kill_iter = (int(x) for x in spec[1].split(":"))
    if rank == kill_rank and iteration == kill_iter:
        os._exit(13)
