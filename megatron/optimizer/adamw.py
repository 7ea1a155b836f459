"""PyTorch's AdamW with the fused kernel's ``found_inf`` and ``grad_scale`` as step arguments.

``torch.optim.AdamW(fused=True)`` can skip a step on the device (``found_inf`` 1: no update,
no host sync) and divide the gradients by ``grad_scale`` inside its kernel (clipping without
a pass of its own). Its ``step()`` takes neither; the functional ``torch.optim.adam.adam``
does. This subclass's ``step`` passes them to it explicitly, group by group, exactly as
``torch.optim.AdamW.step`` calls it otherwise: the same update, state and state dict.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.adam import adam

# The keys of a ``torch.optim.AdamW(fused=True)`` param group besides its hyperparameters, for
# groups written elsewhere (the host-offloaded AdamW, imported checkpoints), so that state
# dicts move between them and this optimizer either way.
ADAMW_GROUP_FLAGS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": True,
    "decoupled_weight_decay": True,
}


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose ``step`` accepts ``found_inf`` and ``grad_scale``."""

    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        found_inf: torch.Tensor | None = None,
        grad_scale: torch.Tensor | None = None,
    ) -> float | None:
        """One update. ``found_inf`` (a 0-d float tensor, fused only): 1 skips the update on
        the device. ``grad_scale`` (fused only): the gradients are divided by it first."""
        if (found_inf is not None or grad_scale is not None) and not self.defaults["fused"]:
            raise ValueError("found_inf and grad_scale need AdamW(fused=True)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            max_exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            has_complex = self._init_group(
                group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
            )
            beta1, beta2 = group["betas"]
            adam(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                steps,
                amsgrad=group["amsgrad"],
                has_complex=has_complex,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                fused=group["fused"],
                grad_scale=grad_scale,
                found_inf=found_inf,
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )
        return loss
