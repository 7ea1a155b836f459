"""The feed-forward block: GeLU, or SwiGLU with one fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.model.config import ModelConfig


class ParallelMLP(torch.nn.Module):
    """h -> ffn -> h. With SwiGLU the first projection is 2 x ffn wide: [gate | up]."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.swiglu = config.swiglu
        self.gelu_approximate = "tanh" if config.openai_gelu else "none"
        factory = {"device": device, "dtype": config.params_dtype}
        up_width = 2 * config.ffn_hidden_size if config.swiglu else config.ffn_hidden_size
        self.dense_h_to_4h = torch.nn.Linear(
            config.hidden_size, up_width, bias=config.add_bias_linear, **factory
        )
        self.dense_4h_to_h = torch.nn.Linear(
            config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, **factory
        )
        self.dense_4h_to_h.is_output_projection = True  # scaled init

    def forward(self, hidden_sbh: torch.Tensor) -> torch.Tensor:
        x = self.dense_h_to_4h(hidden_sbh)
        if self.swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(x, approximate=self.gelu_approximate)
        return self.dense_4h_to_h(x)
