"""Self-attention: fused QKV projection, (Ulysses) core attention, output projection.

The math reads as single-device code. Sequence parallelism enters in one place: when the SP
group has more than one rank, the core attention is wrapped in
:class:`~megatron.core.sequence.layer.DistributedAttention`, whose all-to-alls give the local
attention the whole sequence for this rank's block of heads.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from megatron.core.sequence.layer import DistributedAttention, check_heads_for_sp
from megatron.model import deferred_wgrad
from megatron.model.attention_backends import build_local_attention
from megatron.model.config import ModelConfig
from megatron.model.rank_major_qkv import rank_major_linear, rank_major_rows
from megatron.model.rotary import apply_rotary


class CoreAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v over ``[s, b, h, d]`` with the configured backend.

    With ``recompute_granularity="selective"`` the attention is checkpointed: its
    [b, h, s, s] intermediates (classic backend) are recomputed in backward instead of kept.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.backend = build_local_attention(
            config.attention_backend,
            attention_dropout=config.attention_dropout,
            softmax_scale=1.0 / math.sqrt(config.head_dim),
            sdpa_block_size=config.sdpa_block_size,
        )
        self.recompute = config.recompute_granularity == "selective"

    def forward(self, q, k, v, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.backend, q, k, v, use_reentrant=False, doc_ids=doc_ids)
        return self.backend(q, k, v, doc_ids=doc_ids)


def sp_world_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


class ParallelAttention(torch.nn.Module):
    """Causal self-attention with GQA and optional RoPE; input and output ``[s, b, h]``.

    The fused projection's output is laid out ``[q heads | k heads | v heads]`` (each
    ``heads * head_dim`` wide), so with GQA the K/V projections simply produce fewer heads.
    """

    def __init__(
        self,
        config: ModelConfig,
        sp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        mlp_wgrad: deferred_wgrad.WgradQueue | None = None,
    ) -> None:
        """``mlp_wgrad``: the layer's MLP weight gradients, run while dQ/dK/dV are exchanged;
        given (SP only), the output projection's weight gradient likewise waits for the
        output all-to-all's backward."""
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.split_sizes = (q_width, kv_width, kv_width)
        factory = {"device": device, "dtype": config.params_dtype}
        self.query_key_value = torch.nn.Linear(
            config.hidden_size, q_width + 2 * kv_width, bias=config.add_bias_linear, **factory
        )
        sp = sp_world_size(sp_group)
        self.sp = sp
        # SP without head-group pipelining: the projection writes the all-to-all's send layout
        # (rank_major_qkv); with RoPE the rotation comes first, on the plain layout.
        self.rank_major = (
            sp > 1
            and config.sp_rank_major_qkv
            and config.position_embedding_type != "rope"
            and config.sp_overlap_chunks == 1
            and not config.torch_compile
        )
        self._rows: dict[torch.device, torch.Tensor] = {}  # rank_major_rows, per device
        self._kv_repeats = self.num_kv_heads % sp != 0  # fewer K/V heads than ranks
        kv_local = 1 if self._kv_repeats else self.num_kv_heads // sp
        # Columns of rank r's q, k and v blocks in the send buffer.
        self._rank_widths = (q_width // sp, *(2 * (kv_local * self.head_dim,)))
        self.dense_wgrad = deferred_wgrad.WgradQueue() if mlp_wgrad is not None else None
        if sp > 1:
            check_heads_for_sp(self.num_heads, self.num_kv_heads, sp)
            # [s/p, b, h, d] in and out; the local attention sees [s, b, h/p, d].
            self.core_attention = DistributedAttention(
                CoreAttention(config),
                sp_group,
                scatter_idx=2,
                gather_idx=0,
                num_chunks=config.sp_overlap_chunks,
                output_backward_overlap=None if self.dense_wgrad is None else self.dense_wgrad.run,
                qkv_backward_overlap=None if mlp_wgrad is None else mlp_wgrad.run,
            )
        else:
            if mlp_wgrad is not None:
                raise ValueError("deferred weight gradients need sequence parallelism")
            self.core_attention = CoreAttention(config)
        self.dense = torch.nn.Linear(
            q_width, config.hidden_size, bias=config.add_bias_linear, **factory
        )
        self.dense.is_output_projection = True  # scaled init (see GPTModel.reset_parameters)

    def forward(
        self,
        hidden_sbh: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        doc_ids: torch.Tensor | None = None,
        add_output_bias: bool = True,
    ) -> torch.Tensor:
        """``add_output_bias`` False: the output projection skips its bias (the caller's fused
        add + norm adds it)."""
        s, b, _ = hidden_sbh.shape
        if self.rank_major:
            context = self._attend_rank_major(hidden_sbh, doc_ids)  # [s/p, b, h, d]
        else:
            qkv = self.query_key_value(hidden_sbh)  # [s, b, (hq + 2 hkv) d]
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            q_sbhd = q.view(s, b, self.num_heads, self.head_dim)
            k_sbhd = k.view(s, b, self.num_kv_heads, self.head_dim)
            v_sbhd = v.view(s, b, self.num_kv_heads, self.head_dim)
            if rotary is not None:
                # Global positions of this rank's tokens: rotate before the all-to-all.
                cos, sin = rotary
                q_sbhd = apply_rotary(q_sbhd, cos, sin)
                k_sbhd = apply_rotary(k_sbhd, cos, sin)
            context = self._attend(q_sbhd, k_sbhd, v_sbhd, doc_ids)
        context_sbh = context.reshape(s, b, self.num_heads * self.head_dim)
        # [s, b, h]
        return deferred_wgrad.linear(context_sbh, self.dense, self.dense_wgrad, add_output_bias)

    def _attend_rank_major(self, hidden_sbh: torch.Tensor, doc_ids) -> torch.Tensor:
        """Q/K/V projected straight into the all-to-all's send order, then attention."""
        device = hidden_sbh.device
        if device not in self._rows:
            self._rows[device] = rank_major_rows(
                self.num_heads, self.num_kv_heads, self.head_dim, self.sp, device
            )
        widths = None if self._kv_repeats else self._rank_widths
        qkv_pnc = rank_major_linear(
            hidden_sbh, self.query_key_value, self._rows[device], self.sp, widths
        )
        kwargs = {} if doc_ids is None else {"doc_ids": doc_ids}
        return self.core_attention.attend_rank_major(
            qkv_pnc, self._rank_widths, self.head_dim, **kwargs
        )

    def _attend(self, q_sbhd, k_sbhd, v_sbhd, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The core attention. Under ``--torch-compile`` the layer excludes this call from
        compilation (its graph breaks here): the all-to-alls and kernels stay eager."""
        if doc_ids is None:
            return self.core_attention(q_sbhd, k_sbhd, v_sbhd)
        return self.core_attention(q_sbhd, k_sbhd, v_sbhd, doc_ids=doc_ids)
