"""Self-attention: fused QKV projection, core attention, output projection.

The math is single-device code. Sequence parallelism is applied from outside
(:func:`megatron.model.parallelize.parallelize`): it wraps ``core_attention`` in
:class:`~megatron.core.sequence.layer.DistributedAttention`, whose all-to-alls give the local
attention the whole sequence for this rank's block of heads, and may route the projection
through the all-to-all's send layout (``send_order_qkv``, :mod:`megatron.model.rank_major_qkv`).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from megatron.model.attention_backends import build_local_attention
from megatron.model.config import ModelConfig
from megatron.model.deferred_wgrad import DeferrableLinear
from megatron.model.rank_major_qkv import RankMajorQKV
from megatron.model.rotary import rotate_qkv


class CoreAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v over ``[s, b, h, d]`` with the configured backend.

    With ``recompute`` (selective recomputation, set by the parallelisation step) the
    attention is checkpointed: its [b, h, s, s] intermediates (classic backend) are
    recomputed in backward instead of kept.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.backend = build_local_attention(
            config.impl.attention_backend,
            attention_dropout=config.attention_dropout,
            softmax_scale=1.0 / math.sqrt(config.head_dim),
            sdpa_block_size=config.impl.sdpa_block_size,
        )
        self.recompute = False

    def forward(self, q, k, v, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self.backend, q, k, v, use_reentrant=False, doc_ids=doc_ids)
        return self.backend(q, k, v, doc_ids=doc_ids)


class ParallelAttention(torch.nn.Module):
    """Causal self-attention with GQA and optional RoPE; input and output ``[s, b, h]``.

    The fused projection's output is laid out ``[q heads | k heads | v heads]`` (each
    ``heads * head_dim`` wide), so with GQA the K/V projections simply produce fewer heads.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
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
        self.core_attention: torch.nn.Module = CoreAttention(config)
        # Set by the parallelisation step: the projection in the all-to-all's send order.
        self.send_order_qkv: RankMajorQKV | None = None
        self.dense = DeferrableLinear(
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
        if self.send_order_qkv is not None:  # [s/p, b, h, d]
            context = self.send_order_qkv.attend(
                hidden_sbh, self.query_key_value, self.core_attention, doc_ids
            )
        else:
            qkv = self.query_key_value(hidden_sbh)  # [s, b, (hq + 2 hkv) d]
            if rotary is not None:
                # Global positions of this rank's tokens: rotate before the all-to-all.
                qkv_sbhd = qkv.view(s, b, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
                q_sbhd, k_sbhd, v_sbhd = rotate_qkv(
                    qkv_sbhd, *rotary, self.num_heads, self.num_kv_heads
                )
                del qkv, qkv_sbhd  # only the rotated buffer's views live on
            else:
                q, k, v = qkv.split(self.split_sizes, dim=-1)
                q_sbhd = q.view(s, b, self.num_heads, self.head_dim)
                k_sbhd = k.view(s, b, self.num_kv_heads, self.head_dim)
                v_sbhd = v.view(s, b, self.num_kv_heads, self.head_dim)
            context = self._attend(q_sbhd, k_sbhd, v_sbhd, doc_ids)
        context_sbh = context.reshape(s, b, self.num_heads * self.head_dim)
        return self.dense(context_sbh, add_bias=add_output_bias)  # [s, b, h]

    def _attend(self, q_sbhd, k_sbhd, v_sbhd, doc_ids: torch.Tensor | None) -> torch.Tensor:
        """The core attention (with SP: the all-to-alls around the local attention)."""
        if doc_ids is None:
            return self.core_attention(q_sbhd, k_sbhd, v_sbhd)
        return self.core_attention(q_sbhd, k_sbhd, v_sbhd, doc_ids=doc_ids)
