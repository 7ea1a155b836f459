"""Optimizer pieces: AdamW with explicit fused-step arguments, loss scaling, the unscale check."""

from megatron.optimizer.adamw import AdamW
from megatron.optimizer.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    non_finite_check_and_unscale_,
)

__all__ = [
    "AdamW",
    "ConstantGradScaler",
    "DynamicGradScaler",
    "non_finite_check_and_unscale_",
]
