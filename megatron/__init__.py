"""megatron-ulysses: Megatron-style GPT pretraining with DeepSpeed-Ulysses sequence parallelism."""

from megatron.global_vars import get_args

__version__ = "0.1.0"
__all__ = ["get_args", "__version__"]
