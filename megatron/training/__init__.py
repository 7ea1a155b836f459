"""The training loop: :func:`pretrain` (Megatron's entry point, :mod:`.training`), its
callbacks (:mod:`.callbacks`), the micro-batch schedule (:mod:`.microbatches`), the
asynchronous step result (:mod:`.step_result`) and the log lines (:mod:`.log`)."""

from megatron.training.callbacks import TrainingCallback
from megatron.training.training import pretrain

__all__ = ["TrainingCallback", "pretrain"]
