"""Pretrain a GPT with Ulysses sequence parallelism (Megatron's pretrain_gpt.py).

Launch: ``torchrun --nproc-per-node N pretrain_gpt.py --ds-sequence-parallel-size N ...``
(with ``--context-parallel-size R`` the sequence is sharded ``N x R`` ways: Ulysses x ring).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from megatron import get_args
from megatron.core import parallel_state
from megatron.model import GPTModel, ModelConfig, masked_lm_loss
from megatron.training import pretrain
from megatron.training.callbacks import TrainingCallback

_TOKENIZER = None


def get_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from megatron.tokenizer import build_tokenizer

        _TOKENIZER = build_tokenizer(get_args())
    return _TOKENIZER


def model_provider(pre_process: bool = True, post_process: bool = True) -> GPTModel:
    """Build the GPT model from the arguments (Megatron's signature; ``pre_process`` and
    ``post_process`` have no effect: see ``megatron.training.pretrain``)."""
    args = get_args()
    get_tokenizer()  # sets args.padded_vocab_size
    state = parallel_state.get_parallel_state()
    sp_group = state.sp_group if state.dims.sp > 1 else None
    cp_group = state.cp_group if state.dims.cp > 1 else None
    return GPTModel(
        ModelConfig.from_args(args), sp_group=sp_group, device=args.device_obj, cp_group=cp_group
    )


def get_batch(data_iterator):
    """This rank's slice of the next micro-batch, on the training device: with ring
    attention the tokens are first put in its load-balanced order, then cut into one piece
    per (ring rank, Ulysses rank)."""
    from megatron.data.batch import (
        get_batch_from_samples,
        load_balance_for_context_parallel,
        pad_batch_for_sharding,
        sequence_shard_unit,
        slice_batch_for_sequence_parallel,
    )

    args = get_args()
    state = parallel_state.get_parallel_state()
    data = next(data_iterator)
    batch = get_batch_from_samples(
        torch.as_tensor(data["text"]).long(),
        get_tokenizer().eod,
        args.reset_position_ids,
        args.reset_attention_mask,
        args.eod_mask_loss,
    )
    if batch["doc_ids"] is None:  # no --reset-attention-mask: attention is plain causal
        del batch["doc_ids"]
    # a sequence that does not split evenly is padded (out of the loss)
    batch = pad_batch_for_sharding(batch, sequence_shard_unit(state.dims.sp, state.dims.cp))
    batch = load_balance_for_context_parallel(batch, state.dims.cp)
    batch = slice_batch_for_sequence_parallel(batch, state.seq_rank, state.dims.seq)
    device = args.device_obj
    if device.type == "cuda":  # from pageable memory a non_blocking copy may sync the stream
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_func(loss_mask: torch.Tensor, per_token_loss):
    """Mean over the micro-batch's valid tokens of the whole sequence (same on every rank of
    the Ulysses x ring group)."""
    state = parallel_state.get_parallel_state()
    group = state.seq_group if state.dims.seq > 1 else None
    loss = masked_lm_loss(per_token_loss, loss_mask, group)
    return loss, {"lm loss": loss.detach()}


def forward_step(data_iterator, model):
    batch = get_batch(data_iterator)
    losses = model(
        batch["tokens"],
        batch["position_ids"],
        labels=batch["labels"],
        doc_ids=batch.get("doc_ids"),
        loss_mask=batch["loss_mask"],
    )  # TokenLosses: with the mask the chunked loss computes its gradients in forward
    return losses, partial(loss_func, batch["loss_mask"])


def train_valid_test_datasets_provider(train_val_test_num_samples):
    from megatron.data.gpt_dataset import build_train_valid_test_datasets

    return build_train_valid_test_datasets(get_args(), train_val_test_num_samples, get_tokenizer())


def main(
    args_list: list[str] | None = None, callbacks: Sequence[TrainingCallback] = ()
) -> list[float]:
    """Train; ``args_list`` instead of the command line, ``callbacks`` as in ``pretrain``."""
    global _TOKENIZER
    _TOKENIZER = None
    return pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        forward_step_func=forward_step,
        args_list=args_list,
        callbacks=callbacks,
    )


if __name__ == "__main__":
    main()
