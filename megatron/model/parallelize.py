"""Parallelism and the execution fast paths, applied to a single-device GPTModel in one place.

:class:`~megatron.model.GPTModel` builds the math only (its kernel fusions, such as the fused
add + norm, are submodules chosen at construction). :func:`parallelize` then applies, in
this order, what changes how that math runs on several ranks and in memory:

1. ring attention (:func:`apply_context_parallel`): each layer's local attention backend
   wrapped in :class:`~megatron.core.sequence.ring.RingAttention` over the ring group, which
   runs the backend's attention step on K/V blocks passed around the ring;
2. Ulysses sequence parallelism (:func:`apply_sequence_parallel`): each layer's core
   attention wrapped in :class:`~megatron.core.sequence.layer.DistributedAttention`, the
   Q/K/V projection routed through the all-to-all's send order where it can be, and with
   ``--delay-wgrad-compute`` the weight gradients queued behind the backward all-to-alls;
3. activation recomputation and its CPU offload (:func:`apply_recompute`);
4. the MLP over tiles of tokens (:func:`apply_tiled_mlp`).

With both, a layer's attention is: all-to-all over the Ulysses group (this ring rank's
tokens, a block of heads), ring attention over the ring group on that head shard, all-to-all
back.

ZeRO through FSDP2 (:func:`apply_zero`) comes last, once the model is on its device (the
training loop calls it). A new parallelism or fast path is one more ``apply_*`` here.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.distributed as dist

from megatron.core.distributed.fsdp import shard_model_for_zero
from megatron.core.parallel_state import ParallelState
from megatron.core.sequence.heads import head_split
from megatron.core.sequence.layer import DistributedAttention
from megatron.core.sequence.ring import RingAttention
from megatron.model.attention_step import merge_
from megatron.model.config import ModelConfig
from megatron.model.deferred_wgrad import WgradQueue, set_fp32_grads
from megatron.model.rank_major_qkv import RankMajorQKV
from megatron.model.transformer import ParallelTransformer, ParallelTransformerLayer, Segment

logger = logging.getLogger("megatron")


def parallelize(
    model: torch.nn.Module,
    config: ModelConfig,
    sp_group: dist.ProcessGroup | None = None,
    cp_group: dist.ProcessGroup | None = None,
) -> torch.nn.Module:
    """Apply ring attention over ``cp_group`` and Ulysses over ``sp_group`` (each None or
    size 1: none), recomputation and the tiled MLP to ``model`` (a GPTModel) in place;
    returns it."""
    stack: ParallelTransformer = model.transformer
    sp = 1 if sp_group is None else dist.get_world_size(sp_group)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        apply_context_parallel(stack, cp_group)
    if sp > 1:
        apply_sequence_parallel(stack, config, sp_group)
    apply_recompute(stack, config)
    apply_tiled_mlp(stack, config)
    return model


def send_order_qkv_applies(config: ModelConfig, sp: int) -> bool:
    """SP: the projection writes the all-to-all's send layout
    (:mod:`megatron.model.rank_major_qkv`); with RoPE the rotation comes first, on the
    plain layout; even head splits only."""
    return (
        sp > 1
        and head_split(config.num_attention_heads, config.num_key_value_heads, sp).even
        and config.impl.sp_rank_major_qkv
        and config.position_embedding_type != "rope"
    )


def apply_context_parallel(stack: ParallelTransformer, cp_group: dist.ProcessGroup) -> None:
    """Ring attention in every layer: the local attention's input is this ring rank's
    load-balanced pair of chunks (``megatron.core.sequence.ring``), its K/V blocks go round the
    ring; the backend's step computes each block (no attention dropout)."""
    for layer in stack.layers:
        core = layer.self_attention.core_attention
        if core.backend.dropout_p > 0:
            raise ValueError("ring attention has no attention dropout: set it to 0")
        core.backend = RingAttention(core.backend, cp_group, merge_)


def apply_sequence_parallel(
    stack: ParallelTransformer, config: ModelConfig, sp_group: dist.ProcessGroup
) -> None:
    """Ulysses attention in every layer: ``[s/p, b, h, d]`` in and out, the local attention
    on ``[s, b, h/p, d]``."""
    sp = dist.get_world_size(sp_group)
    split = head_split(config.num_attention_heads, config.num_key_value_heads, sp)
    if not split.even:
        _log_uneven_heads(config, sp)
    for layer in stack.layers:
        attn = layer.self_attention
        # --delay-wgrad-compute: the MLP's weight gradients wait for dQ/dK/dV's all-to-all,
        # the output projection's for the output all-to-all's backward.
        mlp_wgrad = dense_wgrad = None
        if config.impl.delay_wgrad_compute:
            mlp_wgrad, dense_wgrad = WgradQueue(), WgradQueue()
            layer.mlp.set_wgrad_queue(mlp_wgrad)
            attn.dense.wgrad_queue = dense_wgrad
        attn.core_attention = DistributedAttention(
            attn.core_attention,
            sp_group,
            scatter_idx=2,
            gather_idx=0,
            output_backward_overlap=None if dense_wgrad is None else dense_wgrad.run,
            qkv_backward_overlap=None if mlp_wgrad is None else mlp_wgrad.run,
        )
        if send_order_qkv_applies(config, sp):
            attn.send_order_qkv = RankMajorQKV(
                config.num_attention_heads, config.num_key_value_heads, config.head_dim, sp
            )


def _log_uneven_heads(config: ModelConfig, sp: int) -> None:
    """One start-up line: the heads per rank, and the fast paths this turns off."""
    off = []
    if config.impl.sp_rank_major_qkv:
        off.append("the send-order QKV projection")
    _log_once(config.num_attention_heads, config.num_key_value_heads, sp, tuple(off))


@cache
def _log_once(num_heads: int, num_kv_heads: int, sp: int, off: tuple[str, ...]) -> None:
    split = head_split(num_heads, num_kv_heads, sp)
    logger.info(
        "> uneven heads over --ds-sequence-parallel-size %d: query heads per rank %s, K/V heads "
        "per rank %s%s",
        sp,
        "/".join(map(str, split.q_counts)),
        "/".join(map(str, split.kv_counts)),
        f"; off (they need equal blocks per rank): {', '.join(off)}" if off else "",
    )


def apply_recompute(stack: ParallelTransformer, config: ModelConfig) -> None:
    """Megatron's activation recomputation:

    * ``full`` + ``uniform``: checkpoint consecutive groups of ``recompute_num_layers``;
    * ``full`` + ``block``: checkpoint each of the first ``recompute_num_layers`` layers;
    * ``selective``: checkpoint only the core attention;

    with ``checkpoint_in_cpu`` (full only) the checkpoints' inputs wait in host memory."""
    n = len(stack.layers)
    if config.impl.recompute_granularity == "selective":
        for layer in stack.layers:
            core = layer.self_attention.core_attention
            getattr(core, "local_attn", core).recompute = True  # inside DistributedAttention
        return
    if config.impl.recompute_granularity != "full":
        return
    k = config.impl.recompute_num_layers
    if config.impl.recompute_method == "uniform":
        stack.segments = [Segment(i, min(i + k, n), True) for i in range(0, n, k)]
    else:  # block: the first k layers, each on its own
        k = min(k, n)
        stack.segments = [Segment(i, i + 1, True) for i in range(k)] + [Segment(k, n)]
    stack.checkpoint_in_cpu = config.impl.checkpoint_in_cpu


def apply_tiled_mlp(stack: ParallelTransformer, config: ModelConfig) -> None:
    """``--tiled-mlp-chunk-size`` > 0: every layer's MLP runs over tiles of that many local
    tokens and recomputes one tile at a time in backward (:mod:`megatron.model.tiled_mlp`).
    Its weight gradients are then summed tile by tile inside that backward: with
    ``--delay-wgrad-compute`` they are not deferred (the output projection's still are)."""
    chunk = config.impl.tiled_mlp_chunk_size
    if chunk <= 0:
        return
    deferred = any(layer.mlp.dense_h_to_4h.wgrad_queue is not None for layer in stack.layers)
    for layer in stack.layers:
        layer.mlp.tile_tokens = chunk
        layer.mlp.set_wgrad_queue(None)
    if deferred:
        logger.info(
            "> --tiled-mlp-chunk-size %d: the MLP's weight gradients are summed over its "
            "tiles in its backward, not deferred (--delay-wgrad-compute still defers the "
            "attention output projection's)",
            chunk,
        )


def apply_zero(
    model: torch.nn.Module,
    state: ParallelState,
    stage: int,
    param_dtype: torch.dtype | None = None,
    forward_prefetch: bool = True,
    offload_params: bool = False,
    pin_memory: bool = True,
) -> torch.nn.Module:
    """ZeRO ``stage`` through FSDP2 over the DP x CP x SP mesh, each transformer layer one unit
    (:func:`megatron.core.distributed.fsdp.shard_model_for_zero`); stage 0 leaves the model
    alone. ``offload_params``: FSDP2's CPU offload of parameters, gradients and optimizer."""
    return shard_model_for_zero(
        model,
        stage,
        state,
        (ParallelTransformerLayer,),
        param_dtype,
        forward_prefetch,
        offload_params,
        pin_memory,
    )


def set_micro_batch_sync(
    model: torch.nn.Module, zero_stage: int, last: bool, fp32_wgrad: bool = True
) -> None:
    """Call before each micro-batch's backward of a step with several. ZeRO 1 shards only the
    optimizer state: until the step's last micro-batch the gradients accumulate unsharded
    (in fp32) and the layers stay gathered, so a step reduce-scatters and all-gathers once,
    not per micro-batch. With ``fp32_wgrad`` (``--no-gradient-accumulation-fusion`` turns it
    off) the deferred weight-gradient GEMMs write and accumulate those fp32 gradients
    themselves; else FSDP2 casts and adds each micro-batch's low-precision ones. Stages 2
    and 3 shard the gradients and reduce every micro-batch."""
    from torch.distributed.fsdp import FSDPModule

    if zero_stage == 1 and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
        set_fp32_grads(model, fp32_wgrad)
