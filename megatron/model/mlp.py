"""The feed-forward block: GeLU, or SwiGLU with one fused gate/up projection.

With ``bias_gelu_fusion`` (Megatron's default; ``--no-bias-gelu-fusion`` turns it off) the
first projection's bias is added inside the GeLU kernel, whose backward also sums the bias
gradient (:func:`megatron.ops.bias_gelu`: Triton on CUDA, else PyTorch's ops, same function).

Both projections are :class:`~megatron.model.deferred_wgrad.DeferrableLinear`: plain linears
unless the parallelisation step queues their weight gradients (``--delay-wgrad-compute``).
With ``tile_tokens`` > 0 (set by the parallelisation step, ``--tiled-mlp-chunk-size``) the
block runs over tiles of that many tokens, forward and backward
(:mod:`megatron.model.tiled_mlp`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.model import deferred_wgrad
from megatron.model.config import ModelConfig
from megatron.model.tiled_mlp import tiled_mlp
from megatron.ops import bias_gelu


class ParallelMLP(torch.nn.Module):
    """h -> ffn -> h. With SwiGLU the first projection is 2 x ffn wide: [gate | up]."""

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str | None = None,
        wgrad_queue: deferred_wgrad.WgradQueue | None = None,
    ) -> None:
        """``wgrad_queue``: where the two projections' weight gradients wait (see
        :mod:`megatron.model.deferred_wgrad`); None computes them in place."""
        super().__init__()
        self.swiglu = config.swiglu
        self.gelu_approximate = "tanh" if config.openai_gelu else "none"
        self.bias_gelu_fusion = (
            config.impl.bias_gelu_fusion and config.add_bias_linear and not config.swiglu
        )
        factory = {"device": device, "dtype": config.params_dtype}
        up_width = 2 * config.ffn_hidden_size if config.swiglu else config.ffn_hidden_size
        self.dense_h_to_4h = deferred_wgrad.DeferrableLinear(
            config.hidden_size, up_width, bias=config.add_bias_linear, **factory
        )
        self.dense_4h_to_h = deferred_wgrad.DeferrableLinear(
            config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear, **factory
        )
        self.dense_4h_to_h.is_output_projection = True  # scaled init
        self.set_wgrad_queue(wgrad_queue)
        self.tile_tokens = 0  # > 0: computed over tiles of this many tokens (tiled_mlp)

    def set_wgrad_queue(self, queue: deferred_wgrad.WgradQueue | None) -> None:
        """Where both projections' weight gradients wait (None: computed in place)."""
        self.dense_h_to_4h.wgrad_queue = self.dense_4h_to_h.wgrad_queue = queue

    def forward(self, hidden_sbh: torch.Tensor, add_output_bias: bool = True) -> torch.Tensor:
        """``add_output_bias`` False: the second projection skips its bias (the caller's
        fused add + norm adds it)."""
        if self.tile_tokens > 0:
            params = [p for p in self.parameters() if p.requires_grad]
            return tiled_mlp(
                lambda x: self._forward(x, add_output_bias), hidden_sbh, self.tile_tokens, params
            )
        return self._forward(hidden_sbh, add_output_bias)

    def _forward(self, hidden_sbh: torch.Tensor, add_output_bias: bool) -> torch.Tensor:
        fuse_bias = self.bias_gelu_fusion  # then the GeLU op adds the first linear's bias
        x = self.dense_h_to_4h(hidden_sbh, add_bias=not fuse_bias)  # [s, b, ffn or 2 ffn]
        if fuse_bias:
            x = bias_gelu(x, self.dense_h_to_4h.bias, self.gelu_approximate)
        elif self.swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(x, approximate=self.gelu_approximate)
        return self.dense_4h_to_h(x, add_bias=add_output_bias)  # [s, b, h]
