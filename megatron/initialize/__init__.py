"""Start-up: the command line (:mod:`.arguments`), its validation (:mod:`.argument_checks`)
and :func:`initialize_megatron` (:mod:`.initialize`), which parses and validates the
arguments, starts torch.distributed, builds the process groups and seeds."""

from megatron.initialize.initialize import initialize_megatron

__all__ = ["initialize_megatron"]
