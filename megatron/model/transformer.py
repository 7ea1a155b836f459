"""Pre-norm transformer layers and the stack; activations sequence-first, ``[s, b, h]``.

A layer is ``x = x + drop(attn(norm1(x)))``, then ``x = x + drop(mlp(norm2(x)))``. Each add
and the norm after it go through the layer's ``add_norm`` (:mod:`megatron.model.residual`):
the add stays pending (the stream is a :class:`~megatron.model.residual.Residual`) until
the next norm performs it, the last add of a layer with the next layer's input norm (or the
final norm): with ``--fused-residual-norm`` in one Triton pass, else PyTorch's add and norm.

The layers are single-device math (``s`` is this rank's slice under SP). Sequence
parallelism and recomputation are applied from outside
(:func:`megatron.model.parallelize.parallelize`); the stack only runs what it is given:

* ``segments``: consecutive runs of layers; a checkpointed run (``torch.utils.checkpoint``,
  non-reentrant, RNG state preserved so dropout replays the same mask) keeps only its input
  and recomputes the rest in backward, and returns the stream summed (one tensor between
  segments). Under SP the recomputed forward repeats the attention all-to-alls in backward;
  every rank runs the same graph in the same order, so the collectives match.
* ``checkpoint_in_cpu``: the input each checkpoint keeps for backward lives in pinned host
  memory until shortly before the recomputation needs it (copied out and back on side
  streams, :mod:`megatron.model.activation_offload`): at the longest sequences these
  ``[s/p, b, h]`` inputs are most of what a fully recomputed model holds.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from megatron.model.activation_offload import HostOffload
from megatron.model.attention import ParallelAttention
from megatron.model.config import ModelConfig
from megatron.model.mlp import ParallelMLP
from megatron.model.norms import build_norm
from megatron.model.residual import Stream, as_tensor, build_add_norm

Rotary = tuple[torch.Tensor, torch.Tensor] | None


class ParallelTransformerLayer(torch.nn.Module):
    """x + drop(attn(norm1(x))), then x + drop(mlp(norm2(x)))."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.input_layernorm = build_norm(config, device)
        self.self_attention = ParallelAttention(config, device)
        self.post_attention_layernorm = build_norm(config, device)
        self.mlp = ParallelMLP(config, device)
        self.add_norm = build_add_norm(config)  # the adds, their dropout and the norms after

    def fuses_bias(self, device: torch.device) -> bool:
        """Whether the output projections' biases are added in the fused add + norm."""
        return self.add_norm.fuses_bias(device)

    def forward(
        self, x: Stream, rotary: Rotary = None, doc_ids: torch.Tensor | None = None
    ) -> Stream:
        """``x`` ``[s, b, h]``, possibly with the previous layer's last add pending; returns
        this layer's output likewise (see :mod:`megatron.model.residual`)."""
        attn, mlp, add_norm = self.self_attention, self.mlp, self.add_norm
        x, h = add_norm.norm(x, self.input_layernorm, attn.query_key_value.weight)
        # bias-dropout-add fusion: the output projections' biases join add_norm's pass
        bias_in_add = add_norm.fuses_bias(h.device)
        attn_out = attn(h, rotary, doc_ids, add_output_bias=not bias_in_add)
        x = add_norm.add(x, attn_out, attn.dense.bias if bias_in_add else None)
        x, h = add_norm.norm(x, self.post_attention_layernorm, mlp.dense_h_to_4h.weight)
        mlp_out = mlp(h, add_output_bias=not bias_in_add)
        # The next layer's norm adds this bias after ZeRO 3 has freed this layer's gathered
        # weights: hand it a copy.
        return add_norm.add(x, mlp_out, mlp.dense_4h_to_h.bias.clone() if bias_in_add else None)


class Segment(NamedTuple):
    """Layers ``start..end`` of the stack, recomputed in backward when ``checkpointed``."""

    start: int
    end: int
    checkpointed: bool = False


class ParallelTransformer(torch.nn.Module):
    """The stack of layers and the final norm."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            ParallelTransformerLayer(config, device) for _ in range(config.num_layers)
        )
        self.final_layernorm = build_norm(config, device)
        self.final_add_norm = build_add_norm(config)  # the last layer's last add, if pending
        # Set by the parallelisation step (activation recomputation).
        self.segments = [Segment(0, config.num_layers)]
        self.checkpoint_in_cpu = False

    def _run_layers(self, start: int, end: int, x: Stream, rotary: Rotary, doc_ids) -> Stream:
        for layer in self.layers[start:end]:
            x = layer(x, rotary, doc_ids)
        return x

    def _run_segment(self, start: int, end: int, x_sbh, rotary, doc_ids) -> torch.Tensor:
        """A recomputed segment: one tensor in, one out."""
        return as_tensor(self._run_layers(start, end, x_sbh, rotary, doc_ids))

    def forward(
        self, hidden_sbh: torch.Tensor, rotary: Rotary = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        x: Stream = hidden_sbh
        recompute = torch.is_grad_enabled()
        # Around each checkpoint call: the inputs it saves for backward wait in host memory.
        # (Tensors saved inside the checkpointed region are the checkpoint's own business.)
        offload = HostOffload() if self.checkpoint_in_cpu and recompute else None
        for start, end, checkpointed in self.segments:
            if not (checkpointed and recompute):
                x = self._run_layers(start, end, x, rotary, doc_ids)
                continue
            with offload.hooks() if offload else contextlib.nullcontext():
                x = checkpoint(
                    self._run_segment,
                    start,
                    end,
                    as_tensor(x),
                    rotary,
                    doc_ids,
                    use_reentrant=False,
                )
        _, out = self.final_add_norm.norm(x, self.final_layernorm)
        return out
