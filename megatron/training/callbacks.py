"""Hooks into ``pretrain``'s training loop: ``pretrain(..., callbacks=[...])``.

Subclass :class:`TrainingCallback` and override the hooks you need; the others do nothing.
Every rank calls them, in list order; ``iteration`` is the one being run, counted from 1.
"""

from __future__ import annotations

import torch


class TrainingCallback:
    """Called by the training loop at fixed points of every iteration."""

    def after_backward(self, iteration: int, model: torch.nn.Module) -> None:
        """The gradients of the iteration are complete (every micro-batch, reduced across
        ranks) and not yet checked, clipped or applied: the hook may read or change them."""

    def on_step_end(self, iteration: int, model: torch.nn.Module) -> None:
        """The optimizer step is launched (its values may not be read yet); the iteration's
        logging, evaluation and checkpoint come next."""
