"""Number of micro-batches per iteration: constant, or Megatron's global-batch-size ramp-up.

One iteration runs ``get()`` micro-batches of ``micro_batch_size`` samples on each of the
``data_parallel_size`` replicas, i.e. ``get_current_global_batch_size()`` samples in all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from megatron.errors import UsageError

logger = logging.getLogger(__name__)


class NumMicroBatchesCalculator:
    """Base: holds the current number of micro-batches and global batch size."""

    def __init__(self) -> None:
        self.num_micro_batches = 0
        self.current_global_batch_size = 0

    def get(self) -> int:
        return self.num_micro_batches

    def get_current_global_batch_size(self) -> int:
        return self.current_global_batch_size

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        raise NotImplementedError


class ConstantNumMicroBatches(NumMicroBatchesCalculator):
    """``global_batch_size / (micro_batch_size x data_parallel_size)`` micro-batches, always."""

    def __init__(
        self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int
    ) -> None:
        super().__init__()
        per_step = micro_batch_size * data_parallel_size
        if micro_batch_size <= 0 or global_batch_size <= 0:
            raise UsageError(
                f"--micro-batch-size {micro_batch_size} and --global-batch-size {global_batch_size} "
                "must be positive"
            )
        if global_batch_size % per_step != 0:
            raise UsageError(
                f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}"
            )
        self.num_micro_batches = global_batch_size // per_step
        self.current_global_batch_size = global_batch_size

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        pass


class RampupBatchsizeNumMicroBatches(NumMicroBatchesCalculator):
    """Megatron's ramp-up: the global batch grows from ``start_batch_size`` by
    ``batch_size_increment`` in equal steps of ``ramup_samples / num_increments`` consumed
    samples, and is ``global_batch_size`` once more than ``ramup_samples`` samples are consumed.
    """

    def __init__(
        self,
        start_batch_size: int,
        batch_size_increment: int,
        ramup_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        rank: int = 0,
    ) -> None:
        super().__init__()
        flag = f"--rampup-batch-size {start_batch_size} {batch_size_increment} {ramup_samples}"
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise UsageError(f"--micro-batch-size {micro_batch_size} must be positive")
        if start_batch_size <= 0 or batch_size_increment <= 0 or ramup_samples < 0:
            raise UsageError(
                f"{flag}: the start batch size and increment must be positive and the ramp-up "
                "samples >= 0"
            )
        diff_batch_size = global_batch_size - start_batch_size
        if diff_batch_size < 0:
            raise UsageError(
                f"{flag}: the start batch size is larger than --global-batch-size {global_batch_size}"
            )
        if diff_batch_size % batch_size_increment != 0:
            raise UsageError(
                f"{flag}: the increment {batch_size_increment} does not divide --global-batch-size "
                f"{global_batch_size} - start {start_batch_size} = {diff_batch_size}"
            )
        per_step = self.micro_batch_times_data_parallel_size
        # Every batch size start + k x increment must split into whole micro-batches; checking
        # start and increment up front fails at start-up instead of mid-ramp.
        if start_batch_size % per_step != 0 or (
            diff_batch_size and batch_size_increment % per_step
        ):
            raise UsageError(
                f"{flag}: the start batch size and increment must be multiples of --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}"
            )
        self.start_batch_size = start_batch_size
        self.batch_size_increment = batch_size_increment
        self.ramup_samples = ramup_samples
        self.global_batch_size = global_batch_size
        self.rank = rank
        num_increments = diff_batch_size // batch_size_increment
        # Megatron divides by zero when there is nothing to ramp; treat it as "already ramped".
        self.rampup_samples_per_increment = (
            ramup_samples / num_increments if num_increments and ramup_samples else 0.0
        )
        self.update(0, False)

    def update(self, consumed_samples: int, consistency_check: bool = True) -> None:
        """Set the batch size for the iteration that starts after ``consumed_samples``."""
        previous = self.current_global_batch_size
        if consumed_samples > self.ramup_samples or self.rampup_samples_per_increment == 0.0:
            self.current_global_batch_size = self.global_batch_size
        else:
            steps = int(consumed_samples / self.rampup_samples_per_increment)
            self.current_global_batch_size = min(
                self.start_batch_size + steps * self.batch_size_increment, self.global_batch_size
            )
        per_step = self.micro_batch_times_data_parallel_size
        if consistency_check and self.current_global_batch_size % per_step != 0:
            raise UsageError(
                f"current global batch size {self.current_global_batch_size} is not divisible by "
                f"--micro-batch-size x data-parallel size = {per_step}; fix --rampup-batch-size"
            )
        self.num_micro_batches = self.current_global_batch_size // per_step
        if self.rank == 0 and self.current_global_batch_size != previous:
            logger.info(
                "global batch size %d (%d micro-batches) from %d consumed samples",
                self.current_global_batch_size,
                self.num_micro_batches,
                consumed_samples,
            )


def _rampup_ints(rampup_batch_size: Sequence) -> tuple[int, int, int]:
    text = " ".join(str(v) for v in rampup_batch_size)
    if len(rampup_batch_size) != 3:
        raise UsageError(
            f"--rampup-batch-size {text}: expected three integers: <start batch size> "
            "<batch size increment> <ramp-up samples>"
        )
    try:
        return tuple(int(v) for v in rampup_batch_size)  # type: ignore[return-value]
    except (TypeError, ValueError):
        raise UsageError(
            f"--rampup-batch-size {text}: expected three integers: <start batch size> "
            "<batch size increment> <ramp-up samples>"
        ) from None


def build_num_microbatches_calculator(
    rank: int,
    rampup_batch_size: Sequence | None,
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
) -> NumMicroBatchesCalculator:
    """Constant micro-batches, or the ramp-up when ``--rampup-batch-size`` is given."""
    if rampup_batch_size is None:
        calculator: NumMicroBatchesCalculator = ConstantNumMicroBatches(
            global_batch_size, micro_batch_size, data_parallel_size
        )
        if rank == 0:
            logger.info("setting number of micro-batches to constant %d", calculator.get())
        return calculator
    start, increment, samples = _rampup_ints(rampup_batch_size)
    if rank == 0:
        logger.info(
            "will use batch size rampup starting from global batch size %d to global batch size "
            "%d with batch size increments %d over %d samples.",
            start,
            global_batch_size,
            increment,
            samples,
        )
    return RampupBatchsizeNumMicroBatches(
        start, increment, samples, global_batch_size, micro_batch_size, data_parallel_size, rank
    )
