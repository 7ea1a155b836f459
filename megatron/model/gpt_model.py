"""GPTModel: embeddings, the transformer stack, the (tied) output layer and per-token loss.

Under Ulysses sequence parallelism every SP rank holds a contiguous ``s/p`` slice of the
tokens, position ids and labels (``[b, s/p]``). Position ids are the GLOBAL positions of
those tokens (learned embeddings look them up, RoPE rotates with them), so the model's
math is the single-device math. The parallel pieces, the DistributedAttention inside each
attention layer, are applied by :func:`megatron.model.parallelize.parallelize`, with
recomputation; the loss normalises over the SP group itself (:func:`masked_lm_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.model.config import ModelConfig
from megatron.model.inplace_grad import embedding_lookup
from megatron.model.loss import TokenLosses, output_layer_cross_entropy
from megatron.model.parallelize import parallelize
from megatron.model.rotary import rotary_cos_sin
from megatron.model.transformer import ParallelTransformer


class Embedding(torch.nn.Module):
    """Word embeddings plus (optionally) learned absolute position embeddings; [b, s] -> [s, b, h]."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": config.params_dtype}
        self.word_embeddings = torch.nn.Embedding(
            config.padded_vocab_size, config.hidden_size, **factory
        )
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = torch.nn.Embedding(
                config.max_position_embeddings, config.hidden_size, **factory
            )
        self.dropout = config.hidden_dropout
        self.fp32_residual_connection = config.impl.fp32_residual_connection
        self.grads_in_place = config.impl.embedding_grads_in_place

    def forward(self, tokens_bs: torch.Tensor, position_ids_bs: torch.Tensor) -> torch.Tensor:
        x_bsh = embedding_lookup(tokens_bs, self.word_embeddings, self.grads_in_place)
        if self.position_embeddings is not None:
            x_bsh = x_bsh + embedding_lookup(
                position_ids_bs, self.position_embeddings, self.grads_in_place
            )
        # The residual stream starts here: in autocast's dtype unless --fp32-residual-connection.
        dtype = x_bsh.dtype
        if torch.is_autocast_enabled(x_bsh.device.type) and not self.fp32_residual_connection:
            dtype = torch.get_autocast_dtype(x_bsh.device.type)
        x_sbh = x_bsh.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format)
        return F.dropout(x_sbh, self.dropout, self.training)


class GPTModel(torch.nn.Module):
    """Decoder-only language model.

    Args:
        config: the architecture (see :class:`ModelConfig`; ``ModelConfig.from_args(args)``).
        sp_group: the Ulysses sequence-parallel process group; ``None`` or size 1: none.
        device: where to create the parameters (default: torch's current default device).
            Parameters are created empty and initialised once by :meth:`reset_parameters`.
        cp_group: the ring (context-parallel) group; ``None`` or size 1: no ring attention.
            With it, the inputs are in the load-balanced order of
            :func:`megatron.core.sequence.ring.load_balanced_order` (the data path's job).

    The constructor builds the single-device model, then applies ``config``'s sequence
    parallelism over ``sp_group`` and recomputation with
    :func:`megatron.model.parallelize.parallelize` (the one place that does).
    """

    def __init__(
        self,
        config: ModelConfig,
        sp_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        cp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if device is None:
            device = torch.get_default_device()
        # Build on the meta device (no throw-away default init), then materialise once.
        with torch.device("meta"):
            self.embedding = Embedding(config)
            self.transformer = ParallelTransformer(config)
            self.output_layer = None
            if config.untie_embeddings_and_output_weights:
                self.output_layer = torch.nn.Parameter(
                    torch.empty(
                        config.padded_vocab_size, config.hidden_size, dtype=config.params_dtype
                    )
                )
        self.to_empty(device=device)
        if torch.device(device).type != "meta":
            self.reset_parameters()
        parallelize(self, config, sp_group, cp_group)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's init: normal(0, std) weights, output projections (attention dense and
        MLP down) with std / sqrt(2 * num_layers), zero biases, unit norms."""
        std = self.config.init_method_std
        scaled_std = std / math.sqrt(2.0 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, torch.nn.Linear):
                out_proj = getattr(module, "is_output_projection", False)
                module.weight.normal_(0.0, scaled_std if out_proj else std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        if self.output_layer is not None:
            self.output_layer.normal_(0.0, std)

    def output_weight(self) -> torch.Tensor:
        """[padded_vocab, h]: the word embeddings unless untied."""
        if self.output_layer is not None:
            return self.output_layer
        return self.embedding.word_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | TokenLosses:
        """Logits [b, s/p, vocab] (``labels`` None), per-token fp32 losses [b, s/p], or with
        ``loss_mask`` [b, s/p] :class:`TokenLosses` (for :func:`masked_lm_loss`; the chunked
        loss then computes its gradients in forward, see :mod:`megatron.model.loss`).

        tokens, position_ids, labels: [b, s/p], this rank's slice; position ids global.
        doc_ids: [b, s] per-token document ids of the WHOLE sequence (packed documents; in
            the load-balanced order under ring attention, like every other input);
            attention never crosses a document boundary.
        """
        hidden_sbh = self.embedding(tokens, position_ids)
        rotary = None
        if self.config.position_embedding_type == "rope":
            rotary = rotary_cos_sin(
                position_ids, self.config.rotary_dim, self.config.rotary_theta
            )  # each [s/p, b, 1, rot]
        hidden_sbh = self.transformer(hidden_sbh, rotary, doc_ids)
        weight = self.output_weight()
        if labels is None:
            return F.linear(hidden_sbh, weight).transpose(0, 1)  # [b, s/p, V]
        return output_layer_cross_entropy(
            hidden_sbh,
            weight,
            labels,
            self.config.impl.loss_chunk_size,
            self.config.impl.cross_entropy_fusion,
            loss_mask,
            self.config.impl.loss_grad_in_forward,
            self.config.impl.embedding_grads_in_place,
        )
