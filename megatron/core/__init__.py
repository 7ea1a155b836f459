"""Core parallelism: process groups, communication primitives, Ulysses attention."""

import sys

from megatron.core import parallel_state

# Megatron code imports the parallel state as ``mpu``: same module object, one state.
mpu = parallel_state
sys.modules[__name__ + ".mpu"] = parallel_state

__all__ = ["parallel_state", "mpu"]
