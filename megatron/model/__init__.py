"""The GPT model with Ulysses sequence-parallel attention.

Build it from the validated arguments: ``GPTModel(ModelConfig.from_args(args), sp_group)``.
"""

from megatron.model.config import ModelConfig
from megatron.model.flops import model_flops_per_token, parameter_counts
from megatron.model.gpt_model import GPTModel
from megatron.model.impl_config import ImplConfig
from megatron.model.loss import masked_lm_loss
from megatron.model.transformer import ParallelTransformerLayer

__all__ = [
    "GPTModel",
    "ImplConfig",
    "ModelConfig",
    "ParallelTransformerLayer",
    "masked_lm_loss",
    "model_flops_per_token",
    "parameter_counts",
]
