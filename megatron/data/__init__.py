"""Data pipeline: indexed token files, GPT datasets, blending, samplers and batches.

Submodules are imported on use (``from megatron.data.gpt_dataset import ...``) so that
tools/preprocess_data.py does not pay for importing torch.
"""
