"""fp16 loss scaling with Megatron's semantics, and the unscale + overflow check of gradients.

``scale`` and ``inv_scale`` are python floats (not tensors as in Megatron): the loss is multiplied
by a number, the state dict is JSON-safe, and no device is pinned. The training loop calls
:func:`non_finite_check_and_unscale_` on the local gradients, all-reduces the flag across ranks,
skips the optimizer step on overflow and then calls ``scaler.update(found_inf)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from megatron.errors import UsageError

logger = logging.getLogger(__name__)

# Fused check-and-unscale (CPU and CUDA kernels in torch 2.x); None forces the fallback.
_fused_op = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)


class ConstantGradScaler:
    """A fixed loss scale (``--loss-scale``); ``update`` changes nothing."""

    def __init__(self, scale: float) -> None:
        if not scale > 0.0:
            raise UsageError(f"--loss-scale {scale} must be > 0")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def inv_scale(self) -> float:
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class DynamicGradScaler(ConstantGradScaler):
    """Megatron's dynamic loss scale with hysteresis.

    Overflow: the growth tracker resets and the hysteresis tracker drops by one; once it is
    <= 0, every overflow multiplies the scale by ``backoff_factor`` (never below ``min_scale``).
    Clean step: the growth tracker counts up; after ``growth_interval`` clean steps in a row the
    scale is multiplied by ``growth_factor`` and the hysteresis tracker is restored. A clean step
    alone does not restore hysteresis (as in Megatron), unless ``consecutive_hysteresis``
    (DeepSpeed's fp16.consecutive_hysteresis): then every clean step restores it, so only
    ``hysteresis`` overflows in a row lower the scale.
    """

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: float = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
    ) -> None:
        if not initial_scale > 0.0:
            raise UsageError(f"--initial-loss-scale {initial_scale} must be > 0")
        if not 0.0 < min_scale <= initial_scale:
            raise UsageError(
                f"--min-loss-scale {min_scale} must be > 0 and <= --initial-loss-scale {initial_scale}"
            )
        if not growth_factor > 1.0:
            raise UsageError(f"loss-scale growth factor {growth_factor} must be > 1")
        if not 0.0 < backoff_factor < 1.0:
            raise UsageError(f"loss-scale backoff factor {backoff_factor} must be in (0, 1)")
        if not (growth_interval > 0 and float(growth_interval).is_integer()):
            raise UsageError(f"--loss-scale-window {growth_interval} must be a positive integer")
        if not (hysteresis > 0 and float(hysteresis).is_integer()):
            raise UsageError(f"--hysteresis {hysteresis} must be a positive integer")
        super().__init__(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step; ``found_inf`` must already agree across ranks."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self.consecutive_hysteresis:
                self._hysteresis_tracker = self.hysteresis
            if self._growth_tracker >= self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Accepts plain numbers, or a 1-element tensor ``scale`` from a Megatron checkpoint."""
        scale = state_dict["scale"]
        self._scale = float(scale.item() if isinstance(scale, torch.Tensor) else scale)
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])


def _inv_scale_on(inv_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(inv_scale, torch.Tensor):
        return inv_scale.detach().to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), inv_scale, dtype=torch.float32, device=device)


def _check_and_unscale_fallback_(
    grads: list[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor
) -> None:
    """Same contract as the fused op: set ``found_inf`` to 1 on a non-finite value, unscale all."""
    all_finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    found_inf.masked_fill_(~all_finite, 1.0)
    for g in grads:
        g.mul_(inv_scale)  # computed in fp32, stored in the grad's dtype, as the fused op does


def non_finite_check_and_unscale_(
    grads: Iterable[torch.Tensor | None], inv_scale: float | torch.Tensor
) -> torch.Tensor:
    """Multiply ``grads`` in place by ``inv_scale``; return a float32 ``[1]`` tensor, 1.0 if any
    value was inf or nan, else 0.0 (no host sync, ready for an all-reduce).

    DTensor gradients are checked through their local shards: the flag is this rank's only, so the
    caller must all-reduce it (MAX or SUM) across the ranks that share the model.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        if g is None:
            continue
        if isinstance(g, DTensor):
            g = g.to_local()  # shares storage: unscaling in place reaches the DTensor
        groups.setdefault((g.device, g.dtype), []).append(g)
    if not groups:
        return torch.zeros(1, dtype=torch.float32)
    found_by_device: dict[torch.device, torch.Tensor] = {}
    for (device, _dtype), group in groups.items():
        if device not in found_by_device:
            found_by_device[device] = torch.zeros(1, dtype=torch.float32, device=device)
        found, inv = found_by_device[device], _inv_scale_on(inv_scale, device)
        if _fused_op is not None:
            try:
                _fused_op(group, found, inv)
                continue
            except NotImplementedError:
                logger.debug("fused unscale has no kernel for %s; using the fallback", device)
        _check_and_unscale_fallback_(group, found, inv)
    devices = list(found_by_device)
    total = found_by_device[devices[0]]
    for device in devices[1:]:
        total = torch.maximum(total, found_by_device[device].to(total.device))
    return total
