"""Inference: sampling text from a trained model (:mod:`.text_generation`,
``tools/generate_text.py``)."""
