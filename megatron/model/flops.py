"""Parameter counts and model FLOPs per token, from the config alone (no model needed)."""

from __future__ import annotations

from megatron.model.config import ModelConfig


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters by kind: ``embedding`` (word + learned positions), ``transformer`` (layers
    and final norm), ``output_layer`` (0 when tied to the word embeddings) and ``total``."""
    h, d = config.hidden_size, config.kv_channels
    hq, hkv, ffn = config.num_attention_heads, config.num_key_value_heads, config.ffn_hidden_size
    bias = config.add_bias_linear
    norm = 2 * h if config.normalization == "LayerNorm" else h
    qkv_out = (hq + 2 * hkv) * d
    attention = h * qkv_out + hq * d * h + (qkv_out + h if bias else 0)
    up_out = 2 * ffn if config.swiglu else ffn
    mlp = h * up_out + ffn * h + (up_out + h if bias else 0)
    transformer = config.num_layers * (2 * norm + attention + mlp) + norm
    embedding = config.padded_vocab_size * h
    if config.position_embedding_type == "learned_absolute":
        embedding += config.max_position_embeddings * h
    output = config.padded_vocab_size * h if config.untie_embeddings_and_output_weights else 0
    return {
        "embedding": embedding,
        "transformer": transformer,
        "output_layer": output,
        "total": embedding + transformer + output,
    }


def model_flops_per_token(config: ModelConfig, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token of a ``seq_length``-token sequence.

    ``6 x (transformer parameters + output layer parameters)``: a multiply-add per weight in
    forward (2 FLOPs) and twice that in backward; the output layer counts whether or not it
    is tied to the embeddings, the embedding lookups count nothing. Plus causal attention,
    ``6 x num_layers x seq_length x (heads x head_dim)``: QK^T and PV are 2 x 2 x s x hd
    FLOPs per token over the whole square, half of it under the causal mask, and backward
    is twice forward. (heads x head_dim equals the hidden size unless --kv-channels
    changes it.) Recomputation is not counted, nor padding added to split the sequence over
    the SP ranks (``seq_length`` is the real tokens'): this is model FLOPs, for MFU.

    The count does not depend on how the sequence is split: under Ulysses x ring each of
    the world's GPUs does ``1 / world`` of it (the ring's load-balanced chunks give every
    ring rank the same number of causal query-key pairs), so the per-GPU TFLOP/s of the log
    line divide by the world size. Key blocks the ring skips because no document spans them
    are counted, as the masked-out pairs of packed documents are without the ring.
    """
    counts = parameter_counts(config)
    dense = counts["transformer"] + config.padded_vocab_size * config.hidden_size
    attn_width = config.num_attention_heads * config.kv_channels
    return 6.0 * dense + 6.0 * config.num_layers * seq_length * attn_width
