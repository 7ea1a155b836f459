"""Megatron's parameter names and layouts -> ours (pure tensors), and back.

Both of Megatron's key schemes are read: the legacy model's (``language_model.embedding``,
``language_model.encoder.layers.N.self_attention.query_key_value``, also Megatron-DeepSpeed's
``input_layernorm``/``final_layernorm`` spelling) and megatron-core's (``decoder.layers.N.
self_attention.linear_qkv``, with Transformer Engine's fused ``layer_norm_weight``).
Transformer Engine's ``_extra_state`` entries and RoPE frequency buffers are not weights
and are skipped.

Megatron interleaves the fused QKV rows per K/V group: ``[g0: q heads, k, v | g1: ...]``
(``[nkv, nq/nkv + 2, d, h]``); ours is ``[all q | all k | all v]`` (see
:mod:`megatron.checkpointing.hf_conversion`). Tensor-parallel shards are merged first:
column-parallel tensors (embeddings, output layer, QKV, first MLP projection; SwiGLU's
``[gate | up]`` halves per rank) along rows, row-parallel weights along columns.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from megatron.errors import UsageError
from megatron.model.config import ModelConfig

Tensors = dict[str, torch.Tensor]

_LAYER = r"(?:language_model\.)?(?:encoder|transformer)\.layers\.(\d+)\."
_CORE = r"decoder\.layers\.(\d+)\."
_OURS = r"transformer.layers.\1."
_RULES = [
    (
        r"(?:language_model\.)?embedding\.word_embeddings\.weight",
        "embedding.word_embeddings.weight",
    ),
    (
        r"(?:language_model\.)?embedding\.position_embeddings\.weight",
        "embedding.position_embeddings.weight",
    ),
    (_LAYER + r"(?:input_norm|input_layernorm)\.(weight|bias)", _OURS + r"input_layernorm.\2"),
    (
        _LAYER + r"(?:post_attention_norm|post_attention_layernorm)\.(weight|bias)",
        _OURS + r"post_attention_layernorm.\2",
    ),
    (
        _LAYER + r"self_attention\.(query_key_value|dense)\.(weight|bias)",
        _OURS + r"self_attention.\2.\3",
    ),
    (_LAYER + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.(weight|bias)", _OURS + r"mlp.\2.\3"),
    (
        r"(?:language_model\.)?(?:encoder|transformer)\.(?:final_norm|final_layernorm)\.(weight|bias)",
        r"transformer.final_layernorm.\1",
    ),
    (r"(?:language_model\.)?output_layer\.weight", "output_layer"),
    (
        _CORE + r"(?:self_attention\.linear_qkv\.layer_norm_|input_layernorm\.)(weight|bias)",
        _OURS + r"input_layernorm.\2",
    ),
    (
        _CORE + r"self_attention\.linear_qkv\.(weight|bias)",
        _OURS + r"self_attention.query_key_value.\2",
    ),
    (_CORE + r"self_attention\.linear_proj\.(weight|bias)", _OURS + r"self_attention.dense.\2"),
    (
        _CORE + r"(?:mlp\.linear_fc1\.layer_norm_|pre_mlp_layernorm\.)(weight|bias)",
        _OURS + r"post_attention_layernorm.\2",
    ),
    (_CORE + r"mlp\.linear_fc1\.(weight|bias)", _OURS + r"mlp.dense_h_to_4h.\2"),
    (_CORE + r"mlp\.linear_fc2\.(weight|bias)", _OURS + r"mlp.dense_4h_to_h.\2"),
    (r"decoder\.final_layernorm\.(weight|bias)", r"transformer.final_layernorm.\1"),
]
_RULES_RE = [(re.compile(p), r) for p, r in _RULES]
# Not weights: Transformer Engine's FP8 metadata, RoPE buffers, the tied head's pipeline copy.
_SKIPPED = re.compile(r".*(_extra_state|\.inv_freq|word_embeddings_for_head\.weight)$")


def our_key(key: str) -> str | None:
    """Our FQN for one of Megatron's keys; None for entries that are not weights."""
    if _SKIPPED.fullmatch(key):
        return None
    for pattern, repl in _RULES_RE:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    raise UsageError(
        f"parameter {key!r}: not a weight of a GPT model this converter knows (MoE, cross "
        "attention and extra norms are not supported)"
    )


def rename(sd: Tensors) -> Tensors:
    """Our FQNs for one tensor-parallel shard of Megatron's flat state dict."""
    out: Tensors = {}
    for key, value in sd.items():
        ours = our_key(key)
        if ours is not None and isinstance(value, torch.Tensor):
            out[ours] = value
    return out


def _merge(
    key: str, parts: list[torch.Tensor], swiglu: bool, qkv_split: list[int] | None
) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    if qkv_split is not None and "query_key_value" in key:  # each rank's [q_r | k_r | v_r]
        pieces = [p.split(qkv_split, dim=0) for p in parts]
        return torch.cat([piece[i] for i in range(3) for piece in pieces], dim=0)
    if key.endswith(("word_embeddings.weight", "output_layer", "query_key_value.weight")) or (
        key.endswith(("query_key_value.bias", "dense_h_to_4h.weight", "dense_h_to_4h.bias"))
    ):
        if swiglu and "dense_h_to_4h" in key:  # each rank holds [gate_r | up_r]
            halves = [p.chunk(2, dim=0) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
        return torch.cat(parts, dim=0)
    if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return torch.cat(parts, dim=1)
    return parts[0]  # replicated: norms, position embeddings, row-parallel biases


def merge_tensor_parallel(
    shards: list[Tensors], swiglu: bool, qkv_split: list[int] | None = None
) -> Tensors:
    """One state dict from the tensor-parallel ranks' (already renamed) state dicts.

    ``qkv_split``: the per-rank widths of q, k, v when each rank holds ``[q_r | k_r | v_r]``
    (None: Megatron's per-group interleave, whose groups the ranks hold in order)."""
    keys = list(shards[0])
    for rank, shard in enumerate(shards[1:], 1):
        if set(shard) != set(keys):
            raise UsageError(f"tensor-parallel rank {rank} holds other parameters than rank 0")
    return {k: _merge(k, [s[k] for s in shards], swiglu, qkv_split) for k in keys}


def split_tensor_parallel(sd: Tensors, tp: int, swiglu: bool) -> list[Tensors]:
    """The inverse of :func:`merge_tensor_parallel` (for export)."""
    out: list[Tensors] = [{} for _ in range(tp)]
    for key, t in sd.items():
        if tp == 1:
            out[0][key] = t
            continue
        if swiglu and "dense_h_to_4h" in key:
            gate, up = t.chunk(2, dim=0)
            parts = [torch.cat(pair, 0) for pair in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]
        elif key.endswith(("word_embeddings.weight", "output_layer")) or (
            "query_key_value" in key or "dense_h_to_4h" in key
        ):
            parts = list(t.chunk(tp, dim=0))
        elif key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
            parts = list(t.chunk(tp, dim=1))
        else:
            parts = [t] * tp
        for rank in range(tp):
            out[rank][key] = parts[rank].contiguous()
    return out


def qkv_from_interleaved(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Megatron's per-group ``[nkv, nq/nkv + 2, d, ...]`` rows -> ``[q | k | v]``."""
    group = heads // kv_heads
    rest = t.shape[1:]
    grouped = t.reshape(kv_heads, group + 2, head_dim, *rest)
    q = grouped[:, :group].reshape(heads * head_dim, *rest)
    k = grouped[:, group].reshape(kv_heads * head_dim, *rest)
    v = grouped[:, group + 1].reshape(kv_heads * head_dim, *rest)
    return torch.cat([q, k, v], dim=0)


def qkv_to_interleaved(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[q | k | v]`` rows -> Megatron's per-group interleave (inverse of the above)."""
    group = heads // kv_heads
    rest = t.shape[1:]
    q, k, v = t.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=0)
    q = q.reshape(kv_heads, group, head_dim, *rest)
    k = k.reshape(kv_heads, 1, head_dim, *rest)
    v = v.reshape(kv_heads, 1, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def to_ours(sd: Tensors, config: ModelConfig, qkv_interleaved: bool) -> Tensors:
    """Our layout of a merged, renamed state dict (QKV rows reordered; fp32, contiguous)."""
    out: Tensors = {}
    for key, t in sd.items():
        if "query_key_value" in key and qkv_interleaved:
            t = qkv_from_interleaved(
                t, config.num_attention_heads, config.num_key_value_heads, config.head_dim
            )
        out[key] = t.to(torch.float32).contiguous()
    return out


def to_megatron_legacy(sd: Tensors) -> Tensors:
    """Our names -> Megatron-LM's legacy GPT keys (``language_model.*``); QKV rows as given."""
    out: Tensors = {}
    for key, t in sd.items():
        name = key
        if key == "output_layer":
            name = "output_layer.weight"
        elif key.startswith("transformer.final_layernorm"):
            name = key.replace("transformer.final_layernorm", "encoder.final_norm")
        elif key.startswith("transformer.layers."):
            name = "encoder." + key[len("transformer.") :]
            name = name.replace(".input_layernorm.", ".input_norm.")
            name = name.replace(".post_attention_layernorm.", ".post_attention_norm.")
        out["language_model." + name] = t.contiguous()
    return out


# ---- Megatron's arguments -> our ModelConfig ----
_REFUSED_ARGS = {
    "apply_layernorm_1p": "--apply-layernorm-1p (norm weights stored as w - 1)",
    "squared_relu": "--squared-relu",
    "qk_layernorm": "--qk-layernorm",
    "rotary_interleaved": "--rotary-interleaved",
    "use_rope_scaling": "--use-rope-scaling",
    "rotary_seq_len_interpolation_factor": "--rotary-seq-len-interpolation-factor",
    "num_experts": "--num-experts (MoE)",
    "add_qkv_bias_only": "QKV biases without linear biases",
}


def config_from_megatron_args(
    a: dict[str, Any], vocab_rows: int, source: str, seq_length: int | None = None
) -> ModelConfig:
    """The ModelConfig that a Megatron(-DeepSpeed) checkpoint's ``args`` describe."""
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if not isinstance(a.get(key), int):
            raise UsageError(f"{source}: its args have no {key}; not a Megatron GPT checkpoint")
    if a.get("add_qkv_bias") and not a.get("add_bias_linear", True):
        a = dict(a, add_qkv_bias_only=True)
    for key, what in _REFUSED_ARGS.items():
        value = a.get(key)
        harmless = value is None or value is False or (value == 1 and not isinstance(value, bool))
        if not harmless and not (key == "num_experts" and value == 0):
            raise UsageError(f"{source}: trained with {what}, which this model does not compute")
    heads = a["num_attention_heads"]
    if a.get("group_query_attention"):
        kv_heads = a.get("num_query_groups") or heads
    else:
        kv_heads = a.get("num_key_value_heads") or heads
    pos = a.get("position_embedding_type")
    if a.get("use_rotary_position_embeddings") or pos in ("rope", "rotary"):
        pos = "rope"
    elif pos in (None, "learned_absolute", "absolute") and a.get("add_position_embedding", True):
        pos = "learned_absolute"
    elif pos in ("none", None):
        pos = "none"
    else:
        raise UsageError(f"{source}: position embedding {pos!r} is not supported")
    norm = (
        "RMSNorm"
        if str(a.get("normalization") or "LayerNorm").lower() == "rmsnorm"
        else "LayerNorm"
    )
    eps = a.get("norm_epsilon") or a.get("layernorm_epsilon") or 1e-5
    seq = seq_length or a.get("seq_length") or a.get("max_position_embeddings")
    return ModelConfig(
        num_layers=a["num_layers"],
        hidden_size=a["hidden_size"],
        num_attention_heads=heads,
        padded_vocab_size=vocab_rows,
        seq_length=seq,
        max_position_embeddings=a.get("max_position_embeddings") or seq,
        ffn_hidden_size=a.get("ffn_hidden_size"),
        kv_channels=a.get("kv_channels"),
        num_key_value_heads=kv_heads,
        position_embedding_type=pos,
        rotary_percent=a.get("rotary_percent") or 1.0,
        rotary_theta=float(a.get("rotary_base") or a.get("rope_theta") or 10000.0),
        normalization=norm,
        layernorm_epsilon=eps,
        swiglu=bool(a.get("swiglu")),
        openai_gelu=bool(a.get("openai_gelu")),
        add_bias_linear=bool(a.get("add_bias_linear", True)),
        untie_embeddings_and_output_weights=bool(a.get("untie_embeddings_and_output_weights")),
        attention_dropout=a.get("attention_dropout", 0.1),
        hidden_dropout=a.get("hidden_dropout", 0.1),
        init_method_std=a.get("init_method_std", 0.02),
    )
