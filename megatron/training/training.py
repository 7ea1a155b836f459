"""Megatron's ``pretrain``: set-up, the training loop, evaluation and logging."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.checkpointing import checkpointing
from megatron.core.distributed.fsdp import (
    any_nonfinite,
    clip_divisor,
    clip_grad_norm,
    grad_norm_and_clip,
    reduce_gradients,
    step_and_gather_next,
)
from megatron.core.parallel_config import ParallelConfig, get_parallel_config, zero_gather_dtype
from megatron.core.parallel_state import ParallelState, get_parallel_state
from megatron.core.random import dropout_seed_offset, set_random_seed
from megatron.errors import UsageError
from megatron.global_vars import get_args
from megatron.initialize.initialize import exit_with_usage_error, initialize_megatron
from megatron.initialize.long_context_args import any_offload
from megatron.model.parallelize import apply_zero, set_micro_batch_sync
from megatron.optimizer.adamw import AdamW
from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.optimizer.optimizer import get_megatron_optimizer
from megatron.optimizer.optimizer_param_scheduler import get_optimizer_param_scheduler
from megatron.training.callbacks import TrainingCallback
from megatron.training.config import TrainingConfig
from megatron.training.log import TensorBoardLogger, iteration_line, peak_memory_gb, validation_line
from megatron.training.microbatches import build_num_microbatches_calculator
from megatron.training.step_result import PendingStep

logger = logging.getLogger("megatron")

# Finish a step's host bookkeeping during the next step (False: at the end of its own
# iteration, as before). Tests switch it off to check that both give the same run.
DEFER_STEP_SYNC = True


@dataclass
class TrainState:
    """Counters that a checkpoint carries (plain numbers, saved as JSON)."""

    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_train_tokens: int = 0
    consumed_valid_samples: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0
    nan_iters_in_a_row: int = 0


class SignalHandler:
    """Remember SIGTERM so the loop can save at the end of the iteration and exit cleanly."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def autocast_context(params_dtype: torch.dtype, device_type: str):
    """Mixed precision: the model runs under autocast to ``params_dtype`` (fp32: no autocast)."""
    if params_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=params_dtype)


def zero_param_dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The dtype ZeRO all-gathers the transformer layers' weights in (``ParallelConfig``'s
    ``zero_param_dtype``): the compute dtype under --bf16/--fp16 (unless
    --fp32-param-gather), else None (fp32, as stored)."""
    return zero_gather_dtype(args.params_dtype, args.fp32_param_gather)


def compute_train_iters(config: TrainingConfig, calculator) -> int:
    """Iterations implied by --train-iters, --train-samples or --train-tokens."""
    if config.train_iters is not None:
        return config.train_iters
    samples = config.train_samples
    if samples is None and config.train_tokens is not None:
        samples = math.ceil(config.train_tokens / config.seq_length)
    if samples is None:
        raise UsageError(
            "give the length of training: --train-iters, --train-samples or --train-tokens"
        )
    if config.rampup_batch_size is None:
        return samples // config.global_batch_size
    iters, consumed = 0, 0
    while consumed < samples:
        calculator.update(consumed, False)
        consumed += calculator.get_current_global_batch_size()
        iters += 1
    calculator.update(0, False)
    return iters


def build_data_iterators(
    args: argparse.Namespace,
    config: TrainingConfig,
    provider: Callable,
    state: ParallelState,
    ts: TrainState,
    train_iters: int,
):
    """(train, validation, test) iterators; ``args`` carries the data loader's flags."""
    from megatron.data.samplers import build_pretraining_data_loader

    if config.eval_interval:
        eval_count = (train_iters // config.eval_interval + 1) * config.eval_iters
    else:  # no periodic validation; --skip-train still validates once
        eval_count = config.eval_iters if config.skip_train else 0
    nums = [
        train_iters * config.global_batch_size,
        eval_count * config.global_batch_size,
        config.eval_iters * config.global_batch_size,
    ]
    train_ds, valid_ds, test_ds = provider(nums)

    def loader(ds, consumed):
        if ds is None:
            return None
        dl = build_pretraining_data_loader(ds, consumed, args, state.dp_rank, state.dims.dp)
        return iter(dl) if dl is not None else None

    return (
        None if config.skip_train else loader(train_ds, ts.consumed_train_samples),
        loader(valid_ds, ts.consumed_valid_samples),
        loader(test_ds, 0),
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for the fused AdamW, whose step skips on the device given ``found_inf``."""
    return isinstance(optimizer, AdamW) and bool(optimizer.defaults["fused"])


def train_step_async(
    forward_step_func: Callable,
    data_iterator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
    config: TrainingConfig,
    parallel: ParallelConfig,
    num_micro: int,
    iteration: int,
    before_optimizer_step: Callable[[], None] | None = None,
    gather_next: bool = True,
    callbacks: Sequence[TrainingCallback] = (),
) -> PendingStep:
    """Launch one optimizer step over ``num_micro`` micro-batches without waiting for the GPU.

    Returns a ``PendingStep`` whose ``read()`` gives (losses, grad_norm, skipped).
    ``before_optimizer_step`` runs exactly once, right before the optimizer step is launched
    (or skipped): the training loop finishes the previous step's host bookkeeping there (the
    LR scheduler's step), so this step's update uses the same LR as with an immediate read.
    ``gather_next``: a training forward follows, so under ZeRO its first all-gathers may start
    during the optimizer step (unless ``--no-overlap-param-gather-with-optimizer-step``).
    ``callbacks``: their ``after_backward`` runs once the gradients are reduced.
    """
    state = get_parallel_state()
    early = gather_next and parallel.overlap_param_gather_with_optimizer_step

    def step(**fused_args: torch.Tensor | None) -> None:
        """The optimizer step; ``fused_args``: ``found_inf``/``grad_scale`` of the fused AdamW."""
        run = functools.partial(optimizer.step, **fused_args)
        if early:
            step_and_gather_next(model, run)
        else:
            run()

    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = {}
    for micro in range(num_micro):
        if num_micro > 1:
            last = micro == num_micro - 1
            set_micro_batch_sync(
                model, parallel.zero_stage, last, parallel.gradient_accumulation_fusion
            )
        with autocast_context(config.params_dtype, parallel.device.type):
            output, loss_func = forward_step_func(data_iterator, model)
            loss, reported = loss_func(output)
        (loss * (scaler.scale / num_micro)).backward()
        for name, value in reported.items():
            totals[name] = totals.get(name, 0.0) + value.detach().float() / num_micro
    reduce_gradients(model, state)
    for callback in callbacks:
        callback.after_backward(iteration, model)
    names = sorted(totals)
    device_flags: list[torch.Tensor] = []  # [grad norm, found_inf], read with the losses
    known: tuple[float | None, bool] | None = None
    if config.fp16:  # the dynamic scaler needs to know now whether the gradients overflowed
        found_inf = any_nonfinite(model, 1.0 / scaler.scale, parallel.device)
        scaler.update(found_inf)
        grad_norm = None if found_inf else clip_grad_norm(model, config.clip_grad)
        if before_optimizer_step is not None:
            before_optimizer_step()
        if not found_inf:
            step()
        known = (grad_norm, found_inf)
    else:
        # bf16/fp32: the step is skipped when the norm is not finite. A fused AdamW skips on
        # the GPU (its found_inf argument), so the whole step is launched without waiting for
        # the GPU; the caller reads the norm and the losses together, later (PendingStep).
        # It also clips, dividing the gradients by its grad_scale: one pass less over them.
        fused = skips_on_device(optimizer)
        fold_clip = fused and config.clip_grad > 0
        norm = grad_norm_and_clip(model, 0.0 if fold_clip else config.clip_grad)
        norm = norm.float().reshape(())
        found = (~torch.isfinite(norm)).float()
        if before_optimizer_step is not None:
            before_optimizer_step()
        if fused:
            divisor = clip_divisor(norm, config.clip_grad) if fold_clip else None
            step(found_inf=found, grad_scale=divisor)
        elif found.item() == 0:
            step()
        # (--cpu-offload-params: the norm is computed where the gradients are, the host)
        device_flags = [norm.to(parallel.device), found.to(parallel.device)]
    # Reported losses: mean over micro-batches, then over data-parallel replicas.
    reported = [totals[n] for n in names]
    if names and state.dims.dp > 1:
        stacked = torch.stack(reported)
        dist.all_reduce(stacked, group=state.dp_group)
        reported = list(stacked / state.dims.dp)
    values = torch.stack(reported + device_flags) if reported or device_flags else None
    return PendingStep(iteration, names, values, known)


@torch.no_grad()
def evaluate(
    forward_step_func, data_iterator, model, config: TrainingConfig, eval_iters: int
) -> dict[str, float]:
    state = get_parallel_state()
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    num_micro = config.global_batch_size // (config.micro_batch_size * state.dims.dp)
    for _ in range(eval_iters):
        for _ in range(num_micro):
            with autocast_context(config.params_dtype, state.mesh.device_type):
                output, loss_func = forward_step_func(data_iterator, model)
                _, reported = loss_func(output)
            for name, value in reported.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float()
    model.train()
    count = eval_iters * num_micro
    out = {}
    for name, value in totals.items():
        value = value / count
        if state.dims.dp > 1:
            dist.all_reduce(value, group=state.dp_group)
            value /= state.dims.dp
        out[name] = value.item()
    return out


def pretrain(
    train_valid_test_datasets_provider: Callable,
    model_provider: Callable[[], torch.nn.Module],
    model_type: object = None,
    forward_step_func: Callable | None = None,
    extra_args_provider: Callable | None = None,
    args_defaults: dict | None = None,
    args_list: list[str] | None = None,
    *,
    callbacks: Sequence[TrainingCallback] = (),
) -> list[float]:
    """Train a model: Megatron's entry point. Returns the per-iteration losses of this run.

    Megatron's positional order is kept, so its scripts' calls work. Two of its parameters
    have no effect here, as there is no pipeline parallelism and one model type:
    ``model_type`` (e.g. ``ModelType.encoder_or_decoder``) is accepted and ignored, and
    ``model_provider`` is called with no arguments, so the ``pre_process``/``post_process``
    parameters of Megatron's ``model_provider(pre_process=True, post_process=True)`` keep
    their defaults. ``callbacks``: hooks into every iteration (``megatron.training.callbacks``).
    """
    initialize_megatron(extra_args_provider, args_defaults, args_list)
    args = get_args()
    try:
        return _pretrain(
            train_valid_test_datasets_provider, model_provider, forward_step_func, args, callbacks
        )
    except UsageError as err:
        exit_with_usage_error(err, args.rank)


def _warn_if_host_memory_short(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """One line when the offloads' predicted host memory exceeds this node's MemAvailable."""
    from megatron.planning.long_context import (
        host_memory_warning,
        local_process_count,
        setup_from_args,
    )

    config = getattr(model, "config", None)
    offloaded = args.checkpoint_in_cpu or any_offload(args)
    if config is None or args.local_rank != 0 or not offloaded:  # one line per node
        return
    try:
        line = host_memory_warning(
            config, setup_from_args(args), local_process_count(args.world_size)
        )
    except UsageError:  # a layout the memory model does not cover: nothing to say
        return
    if line:
        logger.warning(line)


def build_grad_scaler(config: TrainingConfig) -> ConstantGradScaler:
    """fp16: a dynamic (or --loss-scale static) scaler; bf16/fp32: a constant scale of 1.
    The loss-scale flags may come from --deepspeed_config's fp16 block."""
    if not config.fp16:
        return ConstantGradScaler(1.0)
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(
        initial_scale=config.initial_loss_scale,
        min_scale=config.min_loss_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=config.loss_scale_window,
        hysteresis=config.hysteresis,
        consecutive_hysteresis=config.loss_scale_consecutive_hysteresis,
    )


def _pretrain(
    datasets_provider: Callable,
    model_provider: Callable[[], torch.nn.Module],
    forward_step_func: Callable,
    args: argparse.Namespace,
    callbacks: Sequence[TrainingCallback],
) -> list[float]:
    """The run. ``config`` and ``parallel`` are read here; ``args`` still goes to the
    checkpoint, data-loader and TensorBoard code, which read their own flags."""
    config = TrainingConfig.from_args(args)
    parallel = get_parallel_config()
    state = get_parallel_state()
    device = parallel.device
    start = time.time()
    calculator = build_num_microbatches_calculator(
        parallel.rank,
        config.rampup_batch_size,
        config.global_batch_size,
        config.micro_batch_size,
        state.dims.dp,
    )
    train_iters = compute_train_iters(config, calculator)
    checkpointing.check_save_writable(args)

    # Same initial weights on every rank; then each shard gets its own dropout stream.
    set_random_seed(config.seed)
    model = model_provider().to(device)
    model = apply_zero(
        model,
        state,
        parallel.zero_stage,
        parallel.zero_param_dtype,
        forward_prefetch=parallel.overlap_param_gather,
        offload_params=config.cpu_offload_params,
        pin_memory=config.offload_pin_memory,
    )
    optimizer = get_megatron_optimizer(model, config)
    scheduler = get_optimizer_param_scheduler(optimizer, config)
    scaler = build_grad_scaler(config)
    _warn_if_host_memory_short(args, model)
    ts = TrainState()
    set_random_seed(config.seed, dropout_seed_offset(state))
    loaded = checkpointing.load_checkpoint(args, state, model, optimizer, scheduler, scaler, ts)
    checkpointing.check_save_start(args, ts.iteration, train_iters)
    # (iteration, directory) of the checkpoints this run may resume from
    checkpoints = [(ts.iteration, loaded)] if loaded and not config.finetune else []
    logger.info("> model, optimizer and scheduler ready in %.1f s", time.time() - start)
    if train_iters and ts.iteration >= train_iters and not config.skip_train:  # e.g. a restart
        logger.info(
            "> training is complete: the checkpoint is at iteration %d of %d; nothing to train",
            ts.iteration,
            train_iters,
        )
        return []

    train_it, valid_it, test_it = build_data_iterators(
        args, config, datasets_provider, state, ts, train_iters
    )
    tb = TensorBoardLogger(args, parallel.rank)
    handler = SignalHandler() if config.exit_signal_handler else None
    from megatron.model import model_flops_per_token

    flops_per_token = model_flops_per_token(model.config, config.seq_length)
    history: list[float] = []
    unfinished: list[tuple[PendingStep, int]] = []  # at most one launched step (and its gbs)

    def finish() -> None:
        """Host bookkeeping of the step still unfinished, if any (waits for its values)."""
        while unfinished:
            finalize_step(*unfinished.pop(), ts, scheduler, config, history, checkpoints)

    saved_at = ts.iteration  # (a loaded checkpoint is not saved again)

    def save() -> None:
        """Save this iteration, unless its loss is not finite (then the last save stays)."""
        nonlocal saved_at
        if history and not math.isfinite(history[-1]):
            logger.warning(
                "WARNING: the loss of iteration %d is not finite: no checkpoint saved",
                ts.iteration,
            )
            return
        path = checkpointing.save_checkpoint(args, state, model, optimizer, scheduler, scaler, ts)
        checkpoints.append((ts.iteration, path))
        saved_at = ts.iteration

    window_start, window_iters = time.time(), 0
    model.train()
    if config.skip_train:
        logger.info("> --skip-train: evaluating the model at iteration %d", ts.iteration)
    while ts.iteration < train_iters and not config.skip_train:
        if config.train_tokens is not None and ts.consumed_train_tokens >= config.train_tokens:
            break
        calculator.update(ts.consumed_train_samples, True)
        num_micro = calculator.get()
        gbs = calculator.get_current_global_batch_size()
        # The previous step is finished inside, once this step's backward is launched and
        # before its optimizer step: the CPU runs ahead while the GPU completes that step.
        pending = train_step_async(
            forward_step_func,
            train_it,
            model,
            optimizer,
            scaler,
            config,
            parallel,
            num_micro,
            ts.iteration + 1,
            before_optimizer_step=finish,
            gather_next=ts.iteration + 1 < train_iters,
            callbacks=callbacks,
        )
        for callback in callbacks:
            callback.on_step_end(ts.iteration + 1, model)
        ts.iteration += 1
        ts.consumed_train_samples += gbs
        ts.consumed_train_tokens += gbs * config.seq_length
        unfinished.append((pending, gbs))
        window_iters += 1

        log_now = ts.iteration % config.log_interval == 0
        tb_now = tb.active and ts.iteration % config.tensorboard_log_interval == 0
        eval_now = bool(config.eval_interval) and valid_it is not None
        eval_now = eval_now and ts.iteration % config.eval_interval == 0
        save_now = bool(config.save and config.save_interval)
        save_now = save_now and ts.iteration % config.save_interval == 0
        exit_now = bool(config.exit_interval) and ts.iteration % config.exit_interval == 0
        last = ts.iteration >= train_iters or (
            config.train_tokens is not None and ts.consumed_train_tokens >= config.train_tokens
        )
        if not DEFER_STEP_SYNC or log_now or tb_now or eval_now or save_now or exit_now or last:
            finish()

        if log_now or tb_now:
            losses, grad_norm, _ = pending.read()
            elapsed_ms = (time.time() - window_start) * 1000.0 / window_iters
            log_training_iteration(
                config,
                parallel,
                ts,
                tb,
                train_iters=train_iters,
                elapsed_ms=elapsed_ms,
                global_batch_size=gbs,
                losses=losses,
                grad_norm=grad_norm,
                lr=optimizer.param_groups[0]["lr"],
                loss_scale=scaler.scale,
                flops_per_token=flops_per_token,
                line=log_now,
                to_tensorboard=tb_now,
            )
            if log_now:
                window_start, window_iters = time.time(), 0

        if eval_now:
            run_validation(
                "validation",
                forward_step_func,
                valid_it,
                model,
                config,
                ts,
                tb,
                f"iteration {ts.iteration}",
            )

        if save_now:
            save()
        stop = handler is not None and _any_rank(handler.received, device)
        if config.exit_duration_in_mins:
            stop = stop or _any_rank(
                (time.time() - start) / 60.0 > config.exit_duration_in_mins, device
            )
        if stop or exit_now:
            finish()
            if config.save and saved_at != ts.iteration:
                save()
            logger.info("> exiting at iteration %d", ts.iteration)
            tb.close()
            return history

    finish()
    if config.save and saved_at != ts.iteration and ts.iteration > 0:
        save()
    if valid_it is not None and config.eval_iters:
        run_validation(
            "validation",
            forward_step_func,
            valid_it,
            model,
            config,
            ts,
            tb,
            "the end of training for val data",
        )
    if test_it is not None and config.eval_iters:
        run_validation(
            "test",
            forward_step_func,
            test_it,
            model,
            config,
            ts,
            tb,
            "the end of training for test data",
        )
    tb.close()
    return history


def finalize_step(
    pending: PendingStep,
    global_batch_size: int,
    ts: TrainState,
    scheduler,
    config: TrainingConfig,
    history: list[float],
    checkpoints: list[tuple[int, str]] = (),
) -> None:
    """Host bookkeeping of a launched step, once its values are read: skip and NaN counters
    (``--max-nan-iterations``), the LR scheduler's step (only when the weights were updated)
    and the loss history. Call exactly once per step, in iteration order. ``checkpoints``:
    (iteration, directory) of those saved or loaded, for the stop message."""
    losses, _, skipped = pending.read()
    if skipped:
        ts.skipped_iters += 1
        if not config.fp16:
            ts.nan_iters += 1
            ts.nan_iters_in_a_row += 1
            if ts.nan_iters_in_a_row >= config.max_nan_iterations:
                raise UsageError(
                    _nan_stop_message(ts.nan_iters_in_a_row, pending.iteration, checkpoints)
                )
    else:
        ts.nan_iters_in_a_row = 0
        scheduler.step(increment=global_batch_size)
    history.append(losses.get("lm loss", float("nan")))


def _nan_stop_message(count: int, iteration: int, checkpoints: list[tuple[int, str]]) -> str:
    first = iteration - count + 1
    before = [path for it, path in checkpoints if it < first]
    resume = (
        f"then resume from {before[-1]}, the last checkpoint before iteration {first}, with "
        f"--load {before[-1]} --save NEW_DIR"
        if before
        else f"no checkpoint of this run is from before iteration {first}"
    )
    return (
        f"{count} iterations in a row had a non-finite loss or gradient (iterations {first} to "
        f"{iteration}); the weights were not updated and the run stops without saving. Lower "
        f"--lr or check the data; {resume} (--max-nan-iterations sets the limit)"
    )


def log_training_iteration(
    config: TrainingConfig,
    parallel: ParallelConfig,
    ts: TrainState,
    tb: TensorBoardLogger,
    *,
    train_iters: int,
    elapsed_ms: float,
    global_batch_size: int,
    losses: dict[str, float],
    grad_norm: float | None,
    lr: float,
    loss_scale: float,
    flops_per_token: float,
    line: bool = True,
    to_tensorboard: bool = True,
) -> None:
    """Megatron's iteration line (rank 0, every --log-interval) and the TensorBoard scalars
    of this iteration (every --tensorboard-log-interval); the time is the average per
    iteration since the last iteration line."""
    seconds = elapsed_ms / 1000.0
    tokens = global_batch_size * config.seq_length
    tflops = flops_per_token * tokens / seconds / parallel.world_size / 1e12
    peak = peak_memory_gb(parallel.device)
    if line:
        logger.info(
            iteration_line(
                iteration=ts.iteration,
                train_iters=train_iters,
                consumed_samples=ts.consumed_train_samples,
                consumed_tokens=ts.consumed_train_tokens,
                elapsed_ms=elapsed_ms,
                lr=lr,
                global_batch_size=global_batch_size,
                losses=losses,
                loss_scale=loss_scale,
                grad_norm=grad_norm,
                seq_length=config.seq_length,
                skipped=ts.skipped_iters,
                nan_iters=ts.nan_iters,
                world_size=parallel.world_size,
                tflops=tflops,
                peak_mem_gb=peak,
                eta_s=seconds * (train_iters - ts.iteration),
                ulysses=parallel.sequence_parallel_size,
                ring=parallel.context_parallel_size,
            )
        )
    if not to_tensorboard:
        return
    scalars = {
        "lm loss": losses.get("lm loss", float("nan")),
        "learning-rate": lr,
        "batch-size": global_batch_size,
        "loss-scale": loss_scale,
        "iteration-time": seconds,
        "throughput/tflops": tflops,
    }
    if grad_norm is not None:
        scalars["grad-norm"] = grad_norm
    if peak is not None:
        scalars["mem-max-allocated-bytes"] = peak * 2**30
    tb.training(
        ts.iteration,
        ts.consumed_train_samples,
        ts.consumed_train_tokens,
        scalars,
        {"interval": elapsed_ms},
    )


def run_validation(
    prefix,
    forward_step_func,
    data_iterator: Iterator,
    model,
    config: TrainingConfig,
    ts: TrainState,
    tb,
    desc: str,
) -> None:
    losses = evaluate(forward_step_func, data_iterator, model, config, config.eval_iters)
    if prefix == "validation":
        ts.consumed_valid_samples += config.eval_iters * config.global_batch_size
    line = validation_line(prefix, desc, losses)
    logger.info("-" * len(line))
    logger.info(line)
    logger.info("-" * len(line))
    tb.validation(ts.iteration, ts.consumed_train_samples, ts.consumed_train_tokens, losses)
