"""Megatron's name for the parallel state: ``from megatron.core import mpu``.

The same getters as :mod:`megatron.core.parallel_state` (``initialize_model_parallel``,
``get_sequence_parallel_group``, ...); they read the one state kept there.
"""

from megatron.core.parallel_state import *  # noqa: F403
