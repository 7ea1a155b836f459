"""Turning samples into model inputs: labels, loss mask, position ids, document ids, the
padding that makes a sequence split evenly, and the sequence-parallel slice of a batch
(after the ring's load-balanced permutation)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron.core.sequence.ring import load_balanced_order
from megatron.errors import UsageError

SP_SLICED_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class LtorMasks(NamedTuple):
    loss_mask: torch.Tensor  # [b, s] float: 0 where the loss is not taken
    position_ids: torch.Tensor  # [b, s] long
    doc_ids: torch.Tensor | None  # [b, s] int32 document of each token, or None


def get_ltor_masks_and_position_ids(
    tokens: torch.Tensor,
    eod_token: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
) -> LtorMasks:
    """Loss mask, position ids and document ids of left-to-right inputs ``tokens [b, s]``.

    Megatron's semantics without its dense ``[b, 1, s, s]`` mask: a new document starts
    right AFTER each EOD token (the EOD belongs to the document it ends).
    ``eod_mask_loss`` zeroes the loss at EOD inputs; ``reset_position_ids`` restarts
    positions at 0 at each document; ``reset_attention_mask`` returns ``doc_ids`` (tokens
    attend causally within equal ids), else ``doc_ids`` is None (one causal sequence).
    """
    b, s = tokens.shape
    is_eod = tokens == eod_token  # [b, s]
    loss_mask = torch.ones((b, s), dtype=torch.float, device=tokens.device)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    arange = torch.arange(s, dtype=torch.long, device=tokens.device)
    if reset_position_ids:
        # Start of each token's document: one past the last EOD before it (0 if none).
        starts = torch.zeros((b, s), dtype=torch.long, device=tokens.device)
        starts[:, 1:] = torch.where(is_eod[:, :-1], arange[1:], 0)
        position_ids = arange - torch.cummax(starts, dim=1).values
    else:
        position_ids = arange.unsqueeze(0).expand(b, s).clone()
    doc_ids = None
    if reset_attention_mask:
        eod_count = torch.cumsum(is_eod.to(torch.int32), dim=1, dtype=torch.int32)
        doc_ids = eod_count - is_eod.to(torch.int32)  # EODs strictly before each token
    return LtorMasks(loss_mask, position_ids, doc_ids)


def get_batch_from_samples(
    text: torch.Tensor,
    eod_token: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
) -> dict[str, torch.Tensor | None]:
    """Model inputs from samples ``text [b, s + 1]``: ``tokens`` and ``labels`` (both
    ``[b, s]``, labels shifted by one), plus the masks of ``get_ltor_masks_and_position_ids``."""
    tokens = text[:, :-1].contiguous()
    labels = text[:, 1:].contiguous()
    masks = get_ltor_masks_and_position_ids(
        tokens, eod_token, reset_position_ids, reset_attention_mask, eod_mask_loss
    )
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": masks.loss_mask,
        "position_ids": masks.position_ids,
        "doc_ids": masks.doc_ids,
    }


def sequence_shard_unit(sp: int, cp: int = 1) -> int:
    """The sequence length must be a multiple of this: ``sp`` ranks hold equal slices, and
    with ring attention over ``cp`` ranks each rank's part is 2 chunks of a ``2 cp``-way cut
    (for causal load balance)."""
    return sp if cp == 1 else 2 * cp * sp


def padded_seq_length(seq_length: int, unit: int) -> int:
    """``seq_length`` rounded up to a multiple of ``unit``."""
    return -(-seq_length // unit) * unit


def pad_batch_for_sharding(batch: dict, unit: int) -> dict:
    """``batch`` ([b, s] tensors) padded at the end to a multiple of ``unit`` tokens, so the
    loss and gradients are the unpadded ones: padding tokens (id 0, label 0) are out of the
    loss (``loss_mask`` 0), sit after every real token (causal attention keeps them out of
    real tokens' attention) and, with ``doc_ids``, form a document of their own. Their
    position ids are 0 (any valid position would do)."""
    seq = batch["tokens"].shape[1]
    pad = padded_seq_length(seq, unit) - seq
    if pad == 0:
        return batch
    out = dict(batch)
    for key in (*SP_SLICED_KEYS, "doc_ids"):
        value = batch.get(key)
        if value is None:
            continue
        fill = value.new_zeros(value.shape[0], pad)
        if key == "doc_ids":
            fill += value[:, -1:] + 1
        out[key] = torch.cat([value, fill], dim=1)
    return out


def load_balance_for_context_parallel(batch: dict, cp: int) -> dict:
    """The batch in ring attention's load-balanced token order (Megatron-LM's
    ``get_batch_on_this_cp_rank``: ``2 cp`` chunks, ring rank i holds chunks i and
    ``2cp-1-i``): ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` and ``doc_ids`` are
    permuted alike (positions stay the tokens' own, so the model's math is unchanged). The
    SP slice then cuts this order into ``cp x sp`` contiguous pieces, ring rank major."""
    if cp == 1:
        return batch
    order = load_balanced_order(batch["tokens"].shape[1], cp).to(batch["tokens"].device)
    out = dict(batch)
    for key in (*SP_SLICED_KEYS, "doc_ids"):
        value = batch.get(key)
        if value is not None:  # (the batch's tensors share one device)
            out[key] = value[:, order]
    return out


def slice_batch_for_sequence_parallel(batch: dict, sp_rank: int, sp_size: int) -> dict:
    """This SP rank's contiguous ``[b, s/sp]`` slice of ``tokens``, ``labels``, ``loss_mask``
    and ``position_ids``; ``doc_ids`` and any other key stay whole (after the all-to-all
    attention sees the whole sequence, so it needs every token's document)."""
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sequence-parallel rank {sp_rank} of {sp_size}")
    seq = batch["tokens"].shape[1]
    if seq % sp_size:
        raise UsageError(
            f"sequence length {seq} is not divisible by the sequence-parallel size {sp_size}; "
            "pad it first (pad_batch_for_sharding)"
        )
    chunk = seq // sp_size
    out = dict(batch)
    for key in SP_SLICED_KEYS:
        value = batch.get(key)
        if value is not None:
            out[key] = value[:, sp_rank * chunk : (sp_rank + 1) * chunk].contiguous()
    return out
