"""The residual stream's add and the norm after it: one seam, two implementations.

In a pre-norm stack every residual add is followed by a norm: the attention block's by the
post-attention norm, the MLP block's by the next layer's input norm (or the final norm). A
layer therefore reads (:class:`~megatron.model.transformer.ParallelTransformerLayer`)::

    x, h = add_norm.norm(x, norm1)           # h = norm1(x)
    x = add_norm.add(x, attn(h))             # x + drop(attn(h))
    x, h = add_norm.norm(x, norm2)
    return add_norm.add(x, mlp(h))           # x + drop(mlp(h))

:meth:`AddNorm.add` records the addend (the stream becomes a :class:`Residual`, its add
pending) and the next :meth:`AddNorm.norm` (this layer's post-attention norm, the next
layer's input norm, or the stack's final norm) performs the add together with the norm. So
the add that ends a layer and the norm that starts the next meet in one call although they
sit in two modules, and the layer's code is the same for both implementations:

* :class:`AddNorm` (plain): PyTorch's add, then the norm;
* :class:`TritonAddNorm` (``--fused-residual-norm``): both in one Triton pass each way
  (:mod:`megatron.ops.add_norm_triton`).

Bias-dropout-add: ``add`` applies the hidden dropout. Without dropout (``hidden_dropout``
0, or eval) and with ``bias_dropout_fusion`` the fused path also takes the output
projection's bias into its pass (:meth:`AddNorm.fuses_bias`): the linear skips its bias and
the add + norm's backward sums the bias gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from megatron.model.config import ModelConfig
from megatron.model.matmul import linear_compute_dtype
from megatron.ops import triton_kernels_can_run


class Residual(NamedTuple):
    """The residual stream ``x + y (+ bias)`` with the add of ``y`` not yet done (``[s, b, h]``
    each; ``bias`` ``[h]``). A NamedTuple: torch.compile, checkpoint and FSDP2 see through it."""

    x: torch.Tensor
    y: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The stream's dtype (its sum's)."""
        return self.x.dtype

    def sum(self) -> torch.Tensor:
        """The stream as one tensor: ``x + (y + bias)``."""
        y = self.y if self.bias is None else self.y + self.bias
        return self.x + y


Stream = torch.Tensor | Residual


def as_tensor(stream: Stream) -> torch.Tensor:
    """The stream as one ``[s, b, h]`` tensor (a recomputed segment's output)."""
    return stream.sum() if isinstance(stream, Residual) else stream


class AddNorm(torch.nn.Module):
    """The plain add and norm: ``r = x + dropout(y)``, then ``(r, norm(r))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout

    def fuses_bias(self, device: torch.device) -> bool:
        """Whether :meth:`add` takes the output projection's bias (the linear skips it)."""
        return False

    def add(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None = None) -> Residual:
        """``x + dropout(y) (+ bias)``, done by the next :meth:`norm` (``bias`` only where
        :meth:`fuses_bias`: then there is no dropout)."""
        return Residual(x, F.dropout(y, self.hidden_dropout, self.training), bias)

    def norm(
        self, stream: Stream, norm: torch.nn.Module, next_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, norm(x))`` with ``x`` the stream as one tensor. ``next_weight``: the weight
        of the linear that reads ``norm(x)`` (None: the final norm), for the fused path."""
        x = as_tensor(stream)
        return x, norm(x)


class TritonAddNorm(AddNorm):
    """The add deferred to the next norm, both in one Triton pass (see the module docstring).

    Where Triton cannot run (CPU outside the interpreter) the norm adds and normalises with
    PyTorch's ops, as :class:`AddNorm` does."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.bias_in_add = config.impl.bias_dropout_fusion and config.add_bias_linear

    def fuses_bias(self, device: torch.device) -> bool:
        no_dropout = self.hidden_dropout == 0 or not self.training
        return self.bias_in_add and no_dropout and triton_kernels_can_run(device)

    def norm(
        self, stream: Stream, norm: torch.nn.Module, next_weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r, norm(r))``, ``r`` the stream's sum; ``norm(r)`` written in ``next_weight``'s
        compute dtype (the final norm's: the stream's dtype, as the unfused norm's)."""
        if not isinstance(stream, Residual) or not triton_kernels_can_run(stream.x.device):
            return super().norm(stream, norm, next_weight)
        x, y, bias = stream
        from megatron.ops.add_norm_triton import fused_add_norm

        out_dtype = x.dtype if next_weight is None else linear_compute_dtype(x, next_weight)
        return fused_add_norm(x, y, norm, out_dtype, bias)


def build_add_norm(config: ModelConfig) -> AddNorm:
    """The add + norm of ``config``: Triton-fused with ``fused_residual_norm``, else plain."""
    return TritonAddNorm(config) if config.impl.fused_residual_norm else AddNorm(config)
