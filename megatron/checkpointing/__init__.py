"""Checkpoints and conversion: save and load (:mod:`.checkpointing`), the checks before a
save (:mod:`.checks`), the allow-listed reader for loads (:mod:`.safety`), and conversion
to and from Hugging Face (:mod:`.hf_conversion`, :mod:`.hf_conversion_import`,
:mod:`.hf_conversion_io`), and from and to Megatron-LM / Megatron-DeepSpeed (:mod:`.foreign`)."""

from megatron.checkpointing.checkpointing import load_checkpoint, save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]
