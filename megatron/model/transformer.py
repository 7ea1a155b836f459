"""Pre-norm transformer layers and the stack, with Megatron's activation recomputation.

Activations are sequence-first, ``[s, b, h]`` (``s`` is this rank's slice under SP).
Recomputation (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so dropout
replays the same mask):

* ``full`` + ``uniform``: checkpoint consecutive groups of ``recompute_num_layers`` layers;
* ``full`` + ``block``: checkpoint each of the first ``recompute_num_layers`` layers;
* ``selective``: checkpoint only the core attention (see :class:`CoreAttention`).

With ``--checkpoint-in-cpu`` (full recompute) the input each checkpoint keeps for backward
lives in pinned host memory until the recomputation needs it: at the longest sequences these
fp32 ``[s/p, b, h]`` inputs are most of what a fully recomputed model holds.

Under SP the recomputed forward repeats the attention all-to-alls in backward; every rank
runs the same graph in the same order, so the collectives match.

Each residual add is followed by a norm: the attention block's by the post-attention norm,
the MLP block's by the next layer's input norm (or the final norm). A layer therefore returns
its residual stream and its MLP output unsummed, and the next consumer adds them
(:func:`add_norm`). ``--fused-residual-norm`` computes each such add and norm in one Triton
pass each way (:mod:`megatron.ops.add_norm_triton`), with the norm's output written in the
dtype its linear computes in; on CPU it runs only in the Triton interpreter (tests). Each
recomputed segment returns the sum, so a checkpoint keeps one tensor between segments.
With it, and without hidden dropout, Megatron's bias-dropout-add fusion (on unless
``--no-bias-dropout-fusion``) also moves the output projection's and the MLP's second bias
into that pass: the linears skip their bias, and the add + norm's backward sums its gradient.

``--torch-compile`` compiles each layer's forward (norms, projections, activation, residual
adds: fused pointwise work around the matmuls); the core attention stays eager (see
``ParallelAttention._attend``), so each layer compiles to two graphs shared by all layers.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.model.attention import ParallelAttention, sp_world_size
from megatron.model.config import ModelConfig
from megatron.model.deferred_wgrad import WgradQueue
from megatron.model.matmul import linear_compute_dtype
from megatron.model.mlp import ParallelMLP
from megatron.model.norms import build_norm
from megatron.ops import triton_kernels_can_run

Rotary = tuple[torch.Tensor, torch.Tensor] | None


def compile_backend() -> str:
    """torch.compile backend of ``--torch-compile``: inductor; tests may pick a cheaper one."""
    return os.environ.get("MEGATRON_COMPILE_BACKEND", "inductor")


def add_norm(
    x: torch.Tensor,
    y: torch.Tensor | None,
    norm: torch.nn.Module,
    out_dtype: torch.dtype,
    fused: bool,
    y_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, norm(r))`` with ``r = x + y (+ y_bias)`` (``x`` when ``y`` is None). ``fused``
    runs both in one Triton pass and writes ``norm(r)`` in ``out_dtype``; unfused, autocast
    casts it. ``y_bias`` is given only where the fused pass runs
    (:meth:`ParallelTransformerLayer.fuses_bias`)."""
    if y is None:
        return x, norm(x)
    if fused and triton_kernels_can_run(x.device):
        from megatron.ops.add_norm_triton import fused_add_norm

        return fused_add_norm(x, y, norm, out_dtype, y_bias)
    r = x + y if y_bias is None else x + (y + y_bias)
    return r, norm(r)


class ParallelTransformerLayer(torch.nn.Module):
    """x + drop(attn(norm(x))), then + drop(mlp(norm(.))); the last add is left to the caller."""

    def __init__(
        self,
        config: ModelConfig,
        sp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = build_norm(config, device)
        sp = sp_world_size(sp_group)
        # --delay-wgrad-compute: the MLP's weight gradients wait for dQ/dK/dV's all-to-all.
        mlp_wgrad = WgradQueue() if config.delay_wgrad_compute and sp > 1 else None
        self.self_attention = ParallelAttention(config, sp_group, device, mlp_wgrad)
        self.post_attention_layernorm = build_norm(config, device)
        self.mlp = ParallelMLP(config, device, mlp_wgrad)
        self.fused_residual_norm = config.fused_residual_norm
        self.bias_add_in_norm = (
            config.fused_residual_norm and config.bias_dropout_fusion and config.add_bias_linear
        )
        if config.torch_compile:
            # Instance attributes (set only here, so importing the model stays free of dynamo
            # and triton): the module's __call__ and FSDP's hooks stay eager, and so does the
            # core attention.
            attention = self.self_attention
            attention._attend = torch.compiler.disable(attention._attend)
            self.forward = torch.compile(self.forward, backend=compile_backend(), dynamic=False)

    def fuses_bias(self, device: torch.device) -> bool:
        """Whether the output projections' biases are added in the fused add + norm (which
        runs only where Triton can, and has no dropout between the bias and the add)."""
        no_dropout = self.hidden_dropout == 0 or not self.training
        return self.bias_add_in_norm and no_dropout and triton_kernels_can_run(device)

    def forward(
        self,
        hidden_sbh: torch.Tensor,
        rotary: Rotary = None,
        doc_ids: torch.Tensor | None = None,
        prev_mlp_out: torch.Tensor | None = None,
        prev_mlp_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``prev_mlp_out`` (+ ``prev_mlp_bias``): the previous layer's MLP output, not yet
        added to ``hidden_sbh``. Returns ``(residual, mlp_out, mlp_bias)``, whose sum is this
        layer's output (``mlp_bias`` None where the MLP added its own bias)."""
        fused = self.fused_residual_norm
        fuse_bias = self.fuses_bias(hidden_sbh.device)
        qkv_dtype = linear_compute_dtype(hidden_sbh, self.self_attention.query_key_value.weight)
        hidden_sbh, normed = add_norm(
            hidden_sbh, prev_mlp_out, self.input_layernorm, qkv_dtype, fused, prev_mlp_bias
        )
        attn_out = self.self_attention(normed, rotary, doc_ids, add_output_bias=not fuse_bias)
        attn_out = F.dropout(attn_out, self.hidden_dropout, self.training)
        attn_bias = self.self_attention.dense.bias if fuse_bias else None
        mlp_dtype = linear_compute_dtype(hidden_sbh, self.mlp.dense_h_to_4h.weight)
        hidden_sbh, normed = add_norm(
            hidden_sbh, attn_out, self.post_attention_layernorm, mlp_dtype, fused, attn_bias
        )
        mlp_out = self.mlp(normed, add_output_bias=not fuse_bias)
        # The next layer's (or the final) norm adds it, after ZeRO 3 has freed this layer's
        # gathered weights: hand it a copy.
        mlp_bias = self.mlp.dense_4h_to_h.bias.clone() if fuse_bias else None
        return hidden_sbh, F.dropout(mlp_out, self.hidden_dropout, self.training), mlp_bias


class ParallelTransformer(torch.nn.Module):
    """The stack of layers and the final norm."""

    def __init__(
        self,
        config: ModelConfig,
        sp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            ParallelTransformerLayer(config, sp_group, device) for _ in range(config.num_layers)
        )
        self.final_layernorm = build_norm(config, device)
        self.recompute_full = config.recompute_granularity == "full"
        self.recompute_method = config.recompute_method
        self.recompute_num_layers = config.recompute_num_layers
        self.checkpoint_in_cpu = config.checkpoint_in_cpu
        self.fused_residual_norm = config.fused_residual_norm

    def _run_layers(
        self,
        start: int,
        end: int,
        hidden_sbh: torch.Tensor,
        rotary: Rotary,
        doc_ids,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Layers ``start..end``; returns ``(residual, mlp_out, mlp_bias)`` unsummed (see the
        module)."""
        mlp_out = mlp_bias = None
        for layer in self.layers[start:end]:
            hidden_sbh, mlp_out, mlp_bias = layer(hidden_sbh, rotary, doc_ids, mlp_out, mlp_bias)
        return hidden_sbh, mlp_out, mlp_bias

    def _run_segment(self, start: int, end: int, hidden_sbh, rotary, doc_ids) -> torch.Tensor:
        """A recomputed segment: one tensor in, one out."""
        hidden_sbh, mlp_out, mlp_bias = self._run_layers(start, end, hidden_sbh, rotary, doc_ids)
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        return hidden_sbh + mlp_out

    def forward(
        self, hidden_sbh: torch.Tensor, rotary: Rotary = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        n_layers = len(self.layers)
        mlp_out = mlp_bias = None
        if not (self.recompute_full and torch.is_grad_enabled()):
            hidden_sbh, mlp_out, mlp_bias = self._run_layers(
                0, n_layers, hidden_sbh, rotary, doc_ids
            )
        elif self.recompute_method == "uniform":
            step = self.recompute_num_layers
            for start in range(0, n_layers, step):
                end = min(start + step, n_layers)
                with self._inputs_kept_on_host():
                    hidden_sbh = checkpoint(
                        self._run_segment, start, end, hidden_sbh, rotary, doc_ids,
                        use_reentrant=False,
                    )  # fmt: skip
        else:  # block: the first recompute_num_layers layers, each on its own
            k = min(self.recompute_num_layers, n_layers)
            for i in range(k):
                with self._inputs_kept_on_host():
                    hidden_sbh = checkpoint(
                        self._run_segment, i, i + 1, hidden_sbh, rotary, doc_ids,
                        use_reentrant=False,
                    )  # fmt: skip
            hidden_sbh, mlp_out, mlp_bias = self._run_layers(
                k, n_layers, hidden_sbh, rotary, doc_ids
            )
        # The final norm's output keeps the residual stream's dtype, as the unfused norm's.
        _, out = add_norm(
            hidden_sbh, mlp_out, self.final_layernorm, hidden_sbh.dtype,
            self.fused_residual_norm, mlp_bias,
        )  # fmt: skip
        return out

    def _inputs_kept_on_host(self):
        """Around one ``checkpoint`` call: the inputs it saves for backward go to pinned host
        memory under --checkpoint-in-cpu. Tensors saved inside the checkpointed region are
        not affected: the checkpoint's own hooks take precedence there."""
        if not self.checkpoint_in_cpu:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(_to_host, _from_host)


def _to_host(t: torch.Tensor):
    """Copy a GPU tensor to pinned host memory without waiting for it (stream-ordered, so the
    source's memory is reused only after the copy); CPU tensors stay where they are."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return t.device, host


def _from_host(packed) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)
