"""Core parallelism: process groups, communication primitives, Ulysses attention.

``megatron.core.mpu`` is Megatron's name for ``megatron.core.parallel_state``.
"""

from megatron.core import mpu, parallel_state

__all__ = ["parallel_state", "mpu"]
