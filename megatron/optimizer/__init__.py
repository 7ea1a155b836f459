"""Optimizer pieces: loss scaling and the gradient unscale / overflow check."""

from megatron.optimizer.grad_scaler import (
    ConstantGradScaler,
    DynamicGradScaler,
    non_finite_check_and_unscale_,
    unscale_and_check_,
)

__all__ = [
    "ConstantGradScaler",
    "DynamicGradScaler",
    "non_finite_check_and_unscale_",
    "unscale_and_check_",
]
