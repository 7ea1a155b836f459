"""Deterministic faults for tests, as training callbacks; as a script, ``pretrain_gpt.py``
with the faults that the MEGATRON_FAULT environment variable names.

``nan_grad@3`` puts a NaN into a gradient at iteration 3 (1-based), ``nan_grad@3-5`` at
iterations 3 to 5; ``kill@1:4`` kills rank 1 at iteration 4, only in the first torchrun
attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restarted job runs through::

    MEGATRON_FAULT=kill@1:4 torchrun ... tests/fault_injection.py PRETRAIN_GPT_ARGS...
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron.training.callbacks import TrainingCallback


class NanGrad(TrainingCallback):
    """A NaN in the first gradient at iterations ``first`` to ``last``."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def after_backward(self, iteration: int, model: torch.nn.Module) -> None:
        if self.first <= iteration <= self.last:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("nan")
                    return


class KillRank(TrainingCallback):
    """Rank ``rank`` exits with code 13 at the end of ``iteration`` (first attempt only)."""

    def __init__(self, rank: int, iteration: int) -> None:
        self.rank, self.iteration = rank, iteration

    def on_step_end(self, iteration: int, model: torch.nn.Module) -> None:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == self.rank and iteration == self.iteration:
            os._exit(13)


def faults(spec: str) -> list[TrainingCallback]:
    """The callbacks of a ``kind@where`` spec (see the module docstring); "" gives none."""
    if not spec:
        return []
    kind, where = spec.split("@", 1)
    if kind == "nan_grad":
        first, _, last = where.partition("-")
        return [NanGrad(int(first), int(last or first))]
    if kind == "kill":
        rank, iteration = (int(x) for x in where.split(":"))
        return [KillRank(rank, iteration)]
    raise ValueError(f"unknown fault {spec!r}")


if __name__ == "__main__":
    import pretrain_gpt

    pretrain_gpt.main(callbacks=faults(os.environ.get("MEGATRON_FAULT", "")))
