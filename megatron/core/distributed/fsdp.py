"""Gradient reduction over the sequence-data-parallel group, and ZeRO through FSDP2.

Every SP rank's loss is the micro-batch's mean over ALL its tokens (see
``megatron.model.loss``), and each rank's backward only covers its own tokens' share, so
the true gradient is the SUM over the sequence's ranks (Ulysses x ring); data-parallel
replicas are AVERAGED. Both happen in one collective over the DP x CP x SP group: sum, then
divide by the DP size.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron.core.parallel_state import ParallelState
from megatron.optimizer.grad_scaler import non_finite_check_and_unscale_

logger = logging.getLogger(__name__)

_BUCKET_BYTES = 128 * 1024 * 1024


def shard_model_for_zero(
    model: torch.nn.Module,
    stage: int,
    state: ParallelState,
    block_types: tuple,
    param_dtype: torch.dtype | None = None,
    forward_prefetch: bool = True,
    offload_params: bool = False,
    pin_memory: bool = True,
) -> torch.nn.Module:
    """ZeRO 1/2/3 with FSDP2 over the DP x CP x SP mesh; stage 0 leaves the model alone.

    ``offload_params`` (``--cpu-offload-params``): FSDP2's ``CPUOffloadPolicy``, the sharded
    parameters and gradients in host memory (pinned where CUDA is: ``pin_memory``), so the
    optimizer state and step follow them there.

    Stage 1 and 2 keep parameters unsharded between forward and backward
    (``reshard_after_forward=False``); stage 3 reshards them. With ``param_dtype`` bf16/fp16
    the blocks (``block_types``) all-gather their weights in that dtype: FSDP casts each
    fp32 shard before the all-gather (half the bytes, no per-use autocast cast) and copies
    the blocks' low-precision gradients into an fp32 reduce-scatter. The root (embeddings,
    final norm, output layer) keeps fp32.
    """
    if stage == 0:
        return model
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
    )

    if stage == 1:
        logger.info(
            "> --zero-stage 1: gradients reduce-scattered once per step (after the last "
            "micro-batch), optimizer states sharded"
        )
    reshard = stage == 3
    block_kwargs = {}
    if param_dtype in (torch.bfloat16, torch.float16):
        block_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        logger.info("> ZeRO: transformer layers all-gather their weights in %s", param_dtype)
    elif param_dtype not in (None, torch.float32):
        raise ValueError(f"param_dtype {param_dtype}: expected bfloat16, float16 or float32")
    root_kwargs = {}
    if offload_params:
        policy = CPUOffloadPolicy(pin_memory=pin_memory and torch.cuda.is_available())
        block_kwargs["offload_policy"] = root_kwargs["offload_policy"] = policy
        logger.info("> ZeRO: parameters, gradients and optimizer state in host memory")
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    for module in blocks:
        fully_shard(module, mesh=state.sdp_mesh, reshard_after_forward=reshard, **block_kwargs)
    fully_shard(model, mesh=state.sdp_mesh, reshard_after_forward=reshard, **root_kwargs)
    # Forward prefetch (``forward_prefetch``, --no-overlap-param-gather turns it off): each
    # block starts the next one's all-gather. Without it a block's all-gather is issued when
    # the CPU reaches that block, and Ulysses forward passes are CPU-bound, so the GPU waits.
    if forward_prefetch:
        for module, following in zip([model, *blocks], blocks):
            module.set_modules_to_forward_prefetch([following])
    gloo = dist.get_backend(state.sdp_group) == "gloo"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # FSDP divides the summed gradient by this factor: sum over SP, mean over DP.
            module.set_gradient_divide_factor(float(state.dims.dp))
            if gloo:  # gloo has no PREMUL_SUM/AVG: plain sums plus a separate division
                module.set_force_sum_reduction_for_comms(True)
    return model


def step_and_gather_next(model: torch.nn.Module, step: Callable[[], object]) -> None:
    """``step()`` (an optimizer step) that starts the next forward's first all-gathers during
    it (ZeRO).

    A ZeRO forward begins with the root module's all-gather (embeddings and final norm, in
    fp32) and the first layer's, with nothing to hide them behind. Here ``step()`` runs twice:
    first over those shards, their all-gathers are launched (FSDP2's pre-forward waits for
    them), then over the other parameters, meanwhile, on a side stream on the GPU. Each run
    sees only its own parameters' gradients (optimizers skip a parameter whose ``.grad`` is
    None; the others are set aside and put back after), so each parameter gets the update one
    ``step()`` gives it. Without ZeRO this is ``step()``.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        step()
        return
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    later = [p for block in blocks[1:] for p in block.parameters()]
    later_ids = {id(p) for p in later}
    first = [p for p in model.parameters() if id(p) not in later_ids]
    with _grads_set_aside(later):
        step()
    device = next(model.parameters()).device
    side = _side_stream(device) if device.type == "cuda" else None
    if side is not None:  # the later update starts after the first, not after the gathers
        side.wait_stream(torch.cuda.current_stream(device))
    for module in (model, *blocks[:1]):
        module.unshard(async_op=True)  # on the current stream: gathers in the updated shards
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        with _grads_set_aside(first):
            step()
    if side is not None:  # later all-gathers read these shards; freed tensors stay ordered
        torch.cuda.current_stream(device).wait_stream(side)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@contextlib.contextmanager
def _grads_set_aside(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """These parameters have no gradient inside (an optimizer step leaves them alone)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def reduce_gradients(model: torch.nn.Module, state: ParallelState) -> None:
    """ZeRO 0: sum gradients over SP and average over DP, in fp32, in flat buckets."""
    group_size = state.dims.seq * state.dims.dp
    if group_size == 1 or is_sharded(model):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= _BUCKET_BYTES):
            flat = torch.cat([b.reshape(-1).float() for b in bucket])
            dist.all_reduce(flat, group=state.sdp_group)
            flat.div_(state.dims.dp)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


@torch.no_grad()
def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards) as a device tensor; clips to ``max_norm`` > 0.

    No host sync: the caller reads the norm together with everything else it reports. A
    non-finite norm (a nan or inf gradient) leaves the gradients unusable: the step is skipped.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What dividing the gradients by clips them to ``max_norm`` (1 within it), as
    ``clip_grads_with_norm_`` does: a fused Adam/AdamW's ``grad_scale``, so the clipping
    happens inside its step instead of in a pass of its own over the gradients."""
    return ((norm + 1e-6) / max_norm).clamp(min=1.0)


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm (over all shards), clipping to ``max_norm`` when > 0."""
    return grad_norm_and_clip(model, max_norm).item()


@torch.no_grad()
def any_nonfinite(model: torch.nn.Module, inv_scale: float, device: torch.device) -> bool:
    """Unscale the gradients in place by ``inv_scale``; True if any rank saw an inf or nan."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    found = non_finite_check_and_unscale_(grads, inv_scale).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return bool(found.item() > 0)
