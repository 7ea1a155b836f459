"""The tiny GPT every model test uses, batches for it (plain or packed documents), and
helpers to run it and compare gradients."""

from __future__ import annotations

import dataclasses

import torch

from megatron.model import GPTModel, ModelConfig, masked_lm_loss

VOCAB = 100  # real tokens are 1..VOCAB-1; the embedding table is padded to 128
PADDED_VOCAB = 128
EOD = 0
SEQ = 64

# Llama style: RoPE, RMSNorm, SwiGLU, no biases, GQA with 2 K/V heads.
LLAMA = {
    "position_embedding_type": "rope",
    "normalization": "RMSNorm",
    "swiglu": True,
    "add_bias_linear": False,
    "num_key_value_heads": 2,
}


def tiny_config(**overrides) -> ModelConfig:
    """2 layers, hidden 64, 8 heads, seq 64, vocab 128; no dropout, unchunked loss."""
    base = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "padded_vocab_size": PADDED_VOCAB,
        "seq_length": SEQ,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "loss_chunk_size": 0,
    }
    base.update(overrides)
    return ModelConfig(**base)


def reference_config(config: ModelConfig) -> ModelConfig:
    """The plainest way to compute the same model: classic attention, no recompute, unchunked."""
    return dataclasses.replace(
        config,
        attention_backend="classic",
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
        loss_chunk_size=0,
        checkpoint_in_cpu=False,
        delay_wgrad_compute=False,
    )


def doc_ids_and_positions(
    tokens: torch.Tensor, eod: int = EOD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document ids (int32) and positions that restart after every EOD token.

    Like Megatron's get_ltor_masks_and_position_ids with --reset-position-ids and
    --reset-attention-mask: an EOD token ends its document, the next token starts one.
    """
    b, s = tokens.shape
    starts = torch.zeros(b, s, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == eod
    doc_ids = starts.cumsum(dim=1).to(torch.int32)
    idx = torch.arange(s).expand(b, s)
    doc_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return doc_ids, idx - doc_start


def make_batch(batch: int, seed: int, packed: bool = False, seq: int = SEQ) -> dict:
    """tokens, labels, position_ids, loss_mask ([b, s]) and doc_ids ([b, s] or None).

    Packed batches hold a few EOD tokens per row; their positions are masked out of the
    loss (--eod-mask-loss) and documents restart after them.
    """
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(1, VOCAB, (batch, seq + 1), generator=g)
    if packed:
        for row in range(batch):
            cuts = torch.randperm(seq - 2, generator=g)[:3] + 1
            data[row, cuts] = EOD
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    loss_mask = torch.ones(batch, seq)
    if packed:
        loss_mask[tokens == EOD] = 0.0
        doc_ids, position_ids = doc_ids_and_positions(tokens)
    else:
        doc_ids, position_ids = None, torch.arange(seq).expand(batch, seq).contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "doc_ids": doc_ids,
    }


def slice_batch(batch: dict, rank: int, world: int) -> dict:
    """This SP rank's contiguous slice of every [b, s] tensor; doc_ids stay whole."""
    out = {}
    for key, value in batch.items():
        if value is None or key == "doc_ids":
            out[key] = value
            continue
        local = value.shape[1] // world
        out[key] = value[:, rank * local : (rank + 1) * local]
    return out


def build_model(seed: int = 0, **overrides) -> GPTModel:
    """The tiny model (with ``overrides``), initialised from ``seed``."""
    torch.manual_seed(seed)
    return GPTModel(tiny_config(**overrides))


def forward_loss(model: GPTModel, batch: dict, sp_group=None) -> torch.Tensor:
    """The batch's mean loss (over the SP group's ranks with ``sp_group``)."""
    losses = model(
        batch["tokens"],
        batch["position_ids"],
        labels=batch["labels"],
        doc_ids=batch["doc_ids"],
        loss_mask=batch["loss_mask"],
    )  # as pretrain_gpt calls it: the chunked loss computes its gradients in forward
    return masked_lm_loss(losses, batch["loss_mask"], sp_group)


def grads_of(model: GPTModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Same parameter names, each gradient within ``rtol`` (relative norm of the difference)."""
    assert a.keys() == b.keys()
    for name in a:
        err = ((a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-30)).item()
        assert err <= rtol, f"{name}: relative grad difference {err:.2e}"
