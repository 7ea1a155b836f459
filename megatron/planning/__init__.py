"""Planning: the per-GPU memory model (:mod:`.memory_model`, ``tools/estimate_memory.py``)
and the live-tensor tracker that holds it against real runs (:mod:`.memory_tracker`)."""
