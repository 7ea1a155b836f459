"""Map GPTModel weights to and from Hugging Face GPT-2 and Llama checkpoints (pure tensors).

Our layout (FQNs of ``GPTModel.state_dict()``)::

    embedding.word_embeddings.weight                     [V, h]
    embedding.position_embeddings.weight                 [P, h]   (learned positions only)
    transformer.layers.N.input_layernorm.{weight,bias}
    transformer.layers.N.self_attention.query_key_value  [(hq + 2 hkv) d, h]: [q | k | v] heads
    transformer.layers.N.self_attention.dense            [h, hq d]
    transformer.layers.N.post_attention_layernorm
    transformer.layers.N.mlp.dense_h_to_4h               [ffn, h], or [2 ffn, h] = [gate | up]
    transformer.layers.N.mlp.dense_4h_to_h               [h, ffn]
    transformer.final_layernorm
    output_layer                                         [V, h]   (untied only)

GPT-2 keeps Conv1D weights as [in, out] (transposed). Our RoPE rotates halves exactly like
HF Llama's ``rotate_half``, so q/k weights need no permutation. File reading and writing
live in :mod:`megatron.checkpointing.hf_conversion_io`; the import direction in
:mod:`megatron.checkpointing.hf_conversion_import`.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron.errors import UsageError
from megatron.model.config import ModelConfig

Tensors = dict[str, torch.Tensor]

# meta.json ``args`` keys that describe the model's shape: what --use-checkpoint-args copies
# onto the command line (megatron.checkpointing.checkpointing.load_args_from_checkpoint).
MODEL_SHAPE_ARG_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "num_key_value_heads",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_percent",
    "rotary_position_embeddings_theta",
    "normalization",
    "layernorm_epsilon",
    "swiglu",
    "openai_gelu",
    "add_bias_linear",
    "untie_embeddings_and_output_weights",
    "make_vocab_size_divisible_by",
    "seq_length",
)
# The model's arguments an exported checkpoint records: the shape and what was derived from
# it or chosen with it. --use-checkpoint-args copies none of these extras: validation derives
# use_rotary_position_embeddings from the position embedding type, the tokenizer gives the
# padded vocabulary, and dropout and init are the new run's choice.
MODEL_ARG_KEYS = MODEL_SHAPE_ARG_KEYS + (
    "use_rotary_position_embeddings",
    "padded_vocab_size",
    "attention_dropout",
    "hidden_dropout",
    "init_method_std",
)


# ---- our model arguments <-> ModelConfig ----
def config_from_args(args: dict[str, Any], padded_vocab_size: int) -> ModelConfig:
    """The ModelConfig that a checkpoint's meta.json ``args`` describe (dropout kept as saved)."""
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if args.get(key) is None:
            raise UsageError(f"the checkpoint's meta.json args have no {key}; cannot rebuild it")
    pos = args.get("position_embedding_type") or (
        "rope" if args.get("use_rotary_position_embeddings") else "learned_absolute"
    )
    norm = str(args.get("normalization") or "LayerNorm")
    seq = args.get("seq_length") or args.get("max_position_embeddings")
    return ModelConfig(
        num_layers=args["num_layers"],
        hidden_size=args["hidden_size"],
        num_attention_heads=args["num_attention_heads"],
        padded_vocab_size=padded_vocab_size,
        seq_length=seq or 1,
        max_position_embeddings=args.get("max_position_embeddings") or seq,
        ffn_hidden_size=args.get("ffn_hidden_size"),
        kv_channels=args.get("kv_channels"),
        num_key_value_heads=args.get("num_key_value_heads"),
        position_embedding_type=pos,
        rotary_percent=args.get("rotary_percent", 1.0),
        rotary_theta=args.get("rotary_position_embeddings_theta", 10000.0),
        normalization="RMSNorm" if norm.lower() == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=args.get("layernorm_epsilon", 1e-5),
        swiglu=bool(args.get("swiglu", False)),
        openai_gelu=bool(args.get("openai_gelu", False)),
        add_bias_linear=bool(args.get("add_bias_linear", True)),
        untie_embeddings_and_output_weights=bool(
            args.get("untie_embeddings_and_output_weights", False)
        ),
        attention_dropout=args.get("attention_dropout", 0.1),
        hidden_dropout=args.get("hidden_dropout", 0.1),
        init_method_std=args.get("init_method_std", 0.02),
    )


def args_from_config(config: ModelConfig, **extra: Any) -> dict[str, Any]:
    """meta.json ``args`` (flag names as argparse stores them) for ``config``."""
    args = {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "kv_channels": config.kv_channels,
        "num_key_value_heads": config.num_key_value_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "seq_length": config.seq_length,
        "position_embedding_type": config.position_embedding_type,
        "use_rotary_position_embeddings": config.position_embedding_type == "rope",
        "rotary_percent": config.rotary_percent,
        "rotary_position_embeddings_theta": config.rotary_theta,
        "normalization": config.normalization,
        "layernorm_epsilon": config.layernorm_epsilon,
        "swiglu": config.swiglu,
        "openai_gelu": config.openai_gelu,
        "add_bias_linear": config.add_bias_linear,
        "untie_embeddings_and_output_weights": config.untie_embeddings_and_output_weights,
        "padded_vocab_size": config.padded_vocab_size,
        "attention_dropout": config.attention_dropout,
        "hidden_dropout": config.hidden_dropout,
        "init_method_std": config.init_method_std,
    }
    args.update(extra)
    return args


def model_flags(args: dict[str, Any]) -> list[str]:
    """The pretrain_gpt.py flags that rebuild the model ``args`` describe."""
    flags = [
        f"--num-layers {args['num_layers']}",
        f"--hidden-size {args['hidden_size']}",
        f"--ffn-hidden-size {args['ffn_hidden_size']}",
        f"--num-attention-heads {args['num_attention_heads']}",
    ]
    if args["kv_channels"] * args["num_attention_heads"] != args["hidden_size"]:
        flags.append(f"--kv-channels {args['kv_channels']}")
    if args["num_key_value_heads"] != args["num_attention_heads"]:
        flags.append(f"--num-key-value-heads {args['num_key_value_heads']}")
    flags.append(f"--max-position-embeddings {args['max_position_embeddings']}")
    if args["position_embedding_type"] == "rope":
        flags.append("--use-rotary-position-embeddings")
        flags.append(
            f"--rotary-position-embeddings-theta {args['rotary_position_embeddings_theta']:g}"
        )
    if args["normalization"] == "RMSNorm":
        flags.append("--normalization RMSNorm")
    flags.append(f"--layernorm-epsilon {args['layernorm_epsilon']:g}")
    if args["swiglu"]:
        flags.append("--swiglu")
    if args.get("openai_gelu"):
        flags.append("--openai-gelu")
    if not args["add_bias_linear"]:
        flags.append("--disable-bias-linear")
    if args["untie_embeddings_and_output_weights"]:
        flags.append("--untie-embeddings-and-output-weights")
    flags.append(f"--make-vocab-size-divisible-by {args['make_vocab_size_divisible_by']}")
    return flags


def key_mismatch(keys, config: ModelConfig) -> str:
    """How ``keys`` differ from a GPTModel's with ``config`` ("missing [...], unexpected
    [...]", the first three of each), or "" when they are the same."""
    want = expected_keys(config)
    missing, extra = sorted(want - set(keys)), sorted(set(keys) - want)
    return f"missing {missing[:3]}, unexpected {extra[:3]}" if missing or extra else ""


def expected_keys(config: ModelConfig) -> set[str]:
    """Every FQN a GPTModel with ``config`` has (its state_dict keys)."""
    keys = {"embedding.word_embeddings.weight", "transformer.final_layernorm.weight"}
    bias_norm = config.normalization == "LayerNorm"
    if config.position_embedding_type == "learned_absolute":
        keys.add("embedding.position_embeddings.weight")
    if config.untie_embeddings_and_output_weights:
        keys.add("output_layer")
    if bias_norm:
        keys.add("transformer.final_layernorm.bias")
    for i in range(config.num_layers):
        p = f"transformer.layers.{i}."
        names = ["self_attention.query_key_value", "self_attention.dense"]
        names += ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
        for name in names:
            keys.add(p + name + ".weight")
            if config.add_bias_linear:
                keys.add(p + name + ".bias")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            keys.add(p + norm + ".weight")
            if bias_norm:
                keys.add(p + norm + ".bias")
    return keys


# ---- architecture choice ----
def hf_architecture(config: ModelConfig) -> str:
    """ "gpt2" or "llama": the HF architecture that computes exactly what ``config`` does."""
    pos, norm = config.position_embedding_type, config.normalization
    if pos == "learned_absolute" and norm == "LayerNorm" and not config.swiglu:
        if config.num_key_value_heads != config.num_attention_heads:
            raise UsageError(
                f"--num-key-value-heads {config.num_key_value_heads} (GQA) has no GPT-2 "
                "equivalent; export with --format consolidated"
            )
        if config.kv_channels * config.num_attention_heads != config.hidden_size:
            raise UsageError(
                f"--kv-channels {config.kv_channels} x --num-attention-heads "
                f"{config.num_attention_heads} != --hidden-size {config.hidden_size}: GPT-2 "
                "cannot express it; export with --format consolidated"
            )
        return "gpt2"
    if pos == "rope" and norm == "RMSNorm" and config.swiglu:
        if config.rotary_percent != 1.0:
            raise UsageError(
                f"--rotary-percent {config.rotary_percent}: HF Llama rotates whole heads; "
                "export with --format consolidated"
            )
        return "llama"
    raise UsageError(
        f"--position-embedding-type {pos} --normalization {norm} "
        f"{'--swiglu' if config.swiglu else '(GeLU MLP)'} maps to neither HF GPT-2 (learned "
        "positions, LayerNorm, GeLU) nor HF Llama (rope, RMSNorm, --swiglu); export with "
        "--format consolidated"
    )


# ---- export ----
def _trim(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t[:rows].contiguous()


def to_hf(
    sd: Tensors, config: ModelConfig, vocab_size: int | None = None
) -> tuple[Tensors, dict[str, Any]]:
    """HF state dict and config.json dict of our full (unsharded) state dict ``sd``.

    ``vocab_size`` trims the padded vocabulary rows to the tokenizer's true size.
    """
    arch = hf_architecture(config)
    vocab = config.padded_vocab_size if vocab_size is None else vocab_size
    if not 0 < vocab <= config.padded_vocab_size:
        raise UsageError(
            f"--vocab-size {vocab_size} must be between 1 and the checkpoint's padded "
            f"vocabulary size {config.padded_vocab_size}"
        )
    if arch == "gpt2":
        return _to_gpt2(sd, config, vocab), _gpt2_config(config, vocab)
    return _to_llama(sd, config, vocab), _llama_config(config, vocab)


def _bias_or_zeros(sd: Tensors, key: str, size: int, like: torch.Tensor) -> torch.Tensor:
    bias = sd.get(key)
    return bias if bias is not None else torch.zeros(size, dtype=like.dtype)


def _to_gpt2(sd: Tensors, config: ModelConfig, vocab: int) -> Tensors:
    out = {
        "transformer.wte.weight": _trim(sd["embedding.word_embeddings.weight"], vocab),
        "transformer.wpe.weight": sd["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": sd["transformer.final_layernorm.weight"],
        "transformer.ln_f.bias": sd["transformer.final_layernorm.bias"],
    }
    if config.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = _trim(sd["output_layer"], vocab)
    linears = {  # ours -> HF Conv1D (weight [in, out])
        "self_attention.query_key_value": "attn.c_attn",
        "self_attention.dense": "attn.c_proj",
        "mlp.dense_h_to_4h": "mlp.c_fc",
        "mlp.dense_4h_to_h": "mlp.c_proj",
    }
    for i in range(config.num_layers):
        ours, hf = f"transformer.layers.{i}.", f"transformer.h.{i}."
        for a, b in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[hf + b + ".weight"] = sd[ours + a + ".weight"]
            out[hf + b + ".bias"] = sd[ours + a + ".bias"]
        for a, b in linears.items():
            weight = sd[ours + a + ".weight"]  # [out, in]
            out[hf + b + ".weight"] = weight.t().contiguous()
            out[hf + b + ".bias"] = _bias_or_zeros(sd, ours + a + ".bias", weight.shape[0], weight)
    return out


def _to_llama(sd: Tensors, config: ModelConfig, vocab: int) -> Tensors:
    out = {
        "model.embed_tokens.weight": _trim(sd["embedding.word_embeddings.weight"], vocab),
        "model.norm.weight": sd["transformer.final_layernorm.weight"],
    }
    if config.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = _trim(sd["output_layer"], vocab)
    d, ffn = config.head_dim, config.ffn_hidden_size
    qkv_split = [config.num_attention_heads * d] + [config.num_key_value_heads * d] * 2
    bias = config.add_bias_linear
    for i in range(config.num_layers):
        ours, hf = f"transformer.layers.{i}.", f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = sd[ours + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "post_attention_layernorm.weight"]
        for suffix in (".weight", ".bias") if bias else (".weight",):
            qkv = sd[ours + "self_attention.query_key_value" + suffix]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.split(qkv_split, dim=0)):
                out[hf + f"self_attn.{name}{suffix}"] = part.contiguous()
            out[hf + "self_attn.o_proj" + suffix] = sd[ours + "self_attention.dense" + suffix]
            gate, up = sd[ours + "mlp.dense_h_to_4h" + suffix].split([ffn, ffn], dim=0)
            out[hf + "mlp.gate_proj" + suffix] = gate.contiguous()
            out[hf + "mlp.up_proj" + suffix] = up.contiguous()
            out[hf + "mlp.down_proj" + suffix] = sd[ours + "mlp.dense_4h_to_h" + suffix]
    return out


def _gpt2_config(config: ModelConfig, vocab: int) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": config.max_position_embeddings,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "n_inner": config.ffn_hidden_size,
        # GPT-2's own tanh GeLU with --openai-gelu, else exact (erf) GeLU
        "activation_function": "gelu_new" if config.openai_gelu else "gelu",
        "resid_pdrop": config.hidden_dropout,
        "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": config.layernorm_epsilon,
        "initializer_range": config.init_method_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "bos_token_id": None,  # set from the tokenizer when the checkpoint names one
        "eos_token_id": None,
        "use_cache": True,
    }


def _llama_config(config: ModelConfig, vocab: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.layernorm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_theta},
        "rope_theta": config.rotary_theta,  # transformers < 5 reads this key
        "attention_bias": config.add_bias_linear,
        "mlp_bias": config.add_bias_linear,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "bos_token_id": None,  # set from the tokenizer when the checkpoint names one
        "eos_token_id": None,
        "use_cache": True,
    }
