"""Checkpoints of Megatron-LM and Megatron-DeepSpeed: recognise, import, export.

:mod:`.detect` names a foreign layout (also for ``--load``), :mod:`.megatron_lm` and
:mod:`.deepspeed` read one into our FQNs, :mod:`.mapping` holds the key and QKV layout rules,
:mod:`.convert` writes our checkpoint (and Megatron-LM's legacy one), and :mod:`.safe_load`
opens their pickles as data only.
"""
