"""A launched training step's reported values, read from the device only when needed.

The training step ends with one device tensor of [losses..., grad norm, found_inf]. Reading
it with ``.tolist()`` right away makes the CPU wait for the whole step (backward, gradient
reduction, optimizer) before it may launch the next iteration. ``PendingStep`` instead
starts an asynchronous copy into pinned host memory behind a CUDA event, so the CPU can run
ahead into the next iteration's forward and read the values later (``read()`` then waits
for this step's copy only, not for the work launched after it).
"""

from __future__ import annotations

import torch

StepValues = tuple[dict[str, float], float | None, bool]  # (losses, grad norm, skipped)


class PendingStep:
    """The losses, gradient norm and skip flag of one launched training step.

    ``values`` holds the reported losses in the order of ``names``, followed by the grad norm
    and found_inf (1.0: the step was skipped) when ``known`` is None. ``known`` gives
    (grad_norm, skipped) already read on the host (fp16: the dynamic loss scaler needs
    found_inf at once); ``values`` then holds only the losses. ``values`` may be None when
    there is nothing to read on the device.
    """

    def __init__(
        self,
        iteration: int,
        names: list[str],
        values: torch.Tensor | None,
        known: tuple[float | None, bool] | None = None,
    ) -> None:
        self.iteration = iteration
        self.names = list(names)
        self._known = known
        self._values = values
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._result: StepValues | None = None
        if values is not None and values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def read(self) -> StepValues:
        """(losses, grad_norm, skipped): waits for this step's values; cached after the first call."""
        if self._result is not None:
            return self._result
        values: list[float] = []
        if self._host is not None:
            self._event.synchronize()
            values = self._host.tolist()
        elif self._values is not None:
            values = self._values.tolist()
        losses = dict(zip(self.names, values[: len(self.names)]))
        if self._known is not None:
            grad_norm, skipped = self._known
        else:
            skipped = values[-1] > 0
            grad_norm = None if skipped else values[-2]
        self._result = (losses, grad_norm, skipped)
        self._values = self._host = self._event = None  # free the buffers
        return self._result
