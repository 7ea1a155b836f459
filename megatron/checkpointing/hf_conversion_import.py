"""Map Hugging Face GPT-2 and Llama weights onto GPTModel's parameters (pure tensors).

The inverse of :func:`megatron.checkpointing.hf_conversion.to_hf` (see its module docstring for both
layouts). Every tensor of the HF file must be used: a leftover means another architecture.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from megatron.checkpointing.hf_conversion import Tensors
from megatron.errors import UsageError
from megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _take(hf: Tensors, key: str, source: str) -> torch.Tensor:
    try:
        return hf.pop(key)
    except KeyError:
        raise UsageError(f"{source}: missing tensor {key!r}; not a complete checkpoint") from None


def from_hf(hf: Tensors, hf_config: dict[str, Any], source: str) -> tuple[Tensors, ModelConfig]:
    """Our state dict (vocab rows as in the HF file) and ModelConfig of an HF checkpoint.

    ``hf`` is consumed; tensors that no mapping used are an error (another architecture).
    """
    model_type = hf_config.get("model_type")
    if model_type == "gpt2":
        sd, config = _from_gpt2(hf, hf_config, source)
        ignored = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 files
    elif model_type == "llama":
        sd, config = _from_llama(hf, hf_config, source)
        ignored = ("rotary_emb.inv_freq", "lm_head.weight")  # buffer; tied output head copy
    else:
        raise UsageError(
            f"{source}/config.json: model_type {model_type!r} is not supported; import a "
            "'gpt2' or 'llama' checkpoint"
        )
    _check_shapes(sd, config, source)
    left = sorted(k for k in hf if not k.endswith(ignored))
    if left:
        raise UsageError(
            f"{source}: unexpected tensors {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}"
            f" for a {model_type} model of this config.json; not a plain {model_type} checkpoint"
        )
    return {k: v.to(torch.float32).contiguous() for k, v in sd.items()}, config


def _check_shapes(sd: Tensors, config: ModelConfig, source: str) -> None:
    """Every tensor has the shape config.json implies (else it is not this architecture)."""
    from megatron.model import GPTModel

    want = {k: tuple(v.shape) for k, v in GPTModel(config, device="meta").state_dict().items()}
    for key, value in sd.items():
        if tuple(value.shape) != want.get(key):
            raise UsageError(
                f"{source}: a tensor for {key} has shape {tuple(value.shape)}, but config.json "
                f"implies {want.get(key)}; the weights do not match config.json"
            )


def _need(c: dict[str, Any], key: str, source: str) -> Any:
    if c.get(key) is None:
        raise UsageError(f"{source}/config.json: no {key}; not a complete Llama config")
    return c[key]


def _prefix(hf: Tensors, probe: str, prefix: str) -> str:
    return prefix if prefix + probe in hf else ""


def _from_gpt2(hf: Tensors, c: dict[str, Any], source: str) -> tuple[Tensors, ModelConfig]:
    act = c.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS and act != "gelu":
        raise UsageError(
            f"{source}/config.json: activation_function {act!r} is not GeLU; cannot import it"
        )
    if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
        raise UsageError(
            f"{source}/config.json: scale_attn_by_inverse_layer_idx / scale_attn_weights change "
            "the attention scaling; only GPT-2's default 1/sqrt(head size) is supported"
        )
    if c.get("add_cross_attention"):
        raise UsageError(f"{source}/config.json: add_cross_attention is not a decoder-only GPT")
    h, heads = c.get("n_embd", 768), c.get("n_head", 12)
    tied = c.get("tie_word_embeddings", True)
    config = ModelConfig(
        num_layers=c.get("n_layer", 12),
        hidden_size=h,
        num_attention_heads=heads,
        padded_vocab_size=c.get("vocab_size", 50257),
        seq_length=c.get("n_positions", 1024),
        ffn_hidden_size=c.get("n_inner") or 4 * h,
        layernorm_epsilon=c.get("layer_norm_epsilon", 1e-5),
        untie_embeddings_and_output_weights=not tied,
        attention_dropout=c.get("attn_pdrop", 0.1),
        hidden_dropout=c.get("resid_pdrop", 0.1),
        init_method_std=c.get("initializer_range", 0.02),
        openai_gelu=act in _TANH_GELUS,  # GPT-2's tanh GeLU: --openai-gelu
    )
    p = _prefix(hf, "wte.weight", "transformer.")
    sd = {
        "embedding.word_embeddings.weight": _take(hf, p + "wte.weight", source),
        "embedding.position_embeddings.weight": _take(hf, p + "wpe.weight", source),
        "transformer.final_layernorm.weight": _take(hf, p + "ln_f.weight", source),
        "transformer.final_layernorm.bias": _take(hf, p + "ln_f.bias", source),
    }
    if not tied:
        sd["output_layer"] = _take(hf, "lm_head.weight", source)
    else:
        hf.pop("lm_head.weight", None)
    linears = {
        "attn.c_attn": "self_attention.query_key_value",
        "attn.c_proj": "self_attention.dense",
        "mlp.c_fc": "mlp.dense_h_to_4h",
        "mlp.c_proj": "mlp.dense_4h_to_h",
    }
    for i in range(config.num_layers):
        src, ours = f"{p}h.{i}.", f"transformer.layers.{i}."
        for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            sd[ours + b + ".weight"] = _take(hf, src + a + ".weight", source)
            sd[ours + b + ".bias"] = _take(hf, src + a + ".bias", source)
        for a, b in linears.items():
            sd[ours + b + ".weight"] = _take(hf, src + a + ".weight", source).t()
            sd[ours + b + ".bias"] = _take(hf, src + a + ".bias", source)
    return sd, config


def _llama_rope_theta(c: dict[str, Any], source: str) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise UsageError(
            f"{source}/config.json: rope type {rope_type!r} (RoPE scaling) is not supported; "
            "only plain RoPE ('default') maps to --use-rotary-position-embeddings"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UsageError(f"{source}/config.json: partial_rotary_factor is not supported")
    return float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)


def _from_llama(hf: Tensors, c: dict[str, Any], source: str) -> tuple[Tensors, ModelConfig]:
    if c.get("hidden_act", "silu") != "silu":
        raise UsageError(
            f"{source}/config.json: hidden_act {c['hidden_act']!r}; only SiLU (SwiGLU) is supported"
        )
    attn_bias, mlp_bias = bool(c.get("attention_bias")), bool(c.get("mlp_bias"))
    tied = c.get("tie_word_embeddings", False)
    h, heads = _need(c, "hidden_size", source), _need(c, "num_attention_heads", source)
    config = ModelConfig(
        num_layers=_need(c, "num_hidden_layers", source),
        hidden_size=h,
        num_attention_heads=heads,
        padded_vocab_size=_need(c, "vocab_size", source),
        seq_length=c.get("max_position_embeddings", 2048),
        ffn_hidden_size=_need(c, "intermediate_size", source),
        kv_channels=c.get("head_dim") or h // heads,
        num_key_value_heads=c.get("num_key_value_heads") or heads,
        position_embedding_type="rope",
        rotary_theta=_llama_rope_theta(c, source),
        normalization="RMSNorm",
        layernorm_epsilon=c.get("rms_norm_eps", 1e-6),
        swiglu=True,
        add_bias_linear=attn_bias or mlp_bias,
        untie_embeddings_and_output_weights=not tied,
        attention_dropout=c.get("attention_dropout", 0.0),
        hidden_dropout=0.0,
        init_method_std=c.get("initializer_range", 0.02),
    )
    if attn_bias != mlp_bias:
        logger.warning(
            "WARNING: %s has attention_bias=%s but mlp_bias=%s; --add-bias-linear covers both, "
            "so the missing biases are imported as zeros",
            source,
            attn_bias,
            mlp_bias,
        )
    p = _prefix(hf, "embed_tokens.weight", "model.")
    sd = {
        "embedding.word_embeddings.weight": _take(hf, p + "embed_tokens.weight", source),
        "transformer.final_layernorm.weight": _take(hf, p + "norm.weight", source),
    }
    if not tied:
        sd["output_layer"] = _take(hf, "lm_head.weight", source)
    d, ffn = config.head_dim, config.ffn_hidden_size
    widths = {
        "self_attention.query_key_value": (heads + 2 * config.num_key_value_heads) * d,
        "self_attention.dense": h,
        "mlp.dense_h_to_4h": 2 * ffn,
        "mlp.dense_4h_to_h": h,
    }
    for i in range(config.num_layers):
        src, ours = f"{p}layers.{i}.", f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[ours + norm + ".weight"] = _take(hf, src + norm + ".weight", source)
        parts = {
            "self_attention.query_key_value": [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
            ],
            "self_attention.dense": ["self_attn.o_proj"],
            "mlp.dense_h_to_4h": ["mlp.gate_proj", "mlp.up_proj"],
            "mlp.dense_4h_to_h": ["mlp.down_proj"],
        }
        for ours_name, hf_names in parts.items():
            sd[ours + ours_name + ".weight"] = torch.cat(
                [_take(hf, src + n + ".weight", source) for n in hf_names], dim=0
            )
            if not config.add_bias_linear:
                continue
            has_bias = attn_bias if ours_name.startswith("self") else mlp_bias
            if has_bias:
                bias = torch.cat([_take(hf, src + n + ".bias", source) for n in hf_names], dim=0)
            else:
                bias = torch.zeros(widths[ours_name], dtype=sd[ours + ours_name + ".weight"].dtype)
            sd[ours + ours_name + ".bias"] = bias
    return sd, config


def resize_vocab(sd: Tensors, rows: int) -> Tensors:
    """Pad (zero rows: never-produced ids) or trim the vocabulary tensors to ``rows`` rows."""
    out = dict(sd)
    for key in ("embedding.word_embeddings.weight", "output_layer"):
        if key not in sd:
            continue
        t = sd[key]
        if rows <= t.shape[0]:
            out[key] = t[:rows].contiguous()
        else:
            out[key] = torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])], dim=0)
    return out
