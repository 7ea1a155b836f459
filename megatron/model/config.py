"""ModelConfig: the architecture of the GPT model, and how it is computed (``impl``).

Both are frozen dataclasses built once: from the validated arguments
(:meth:`ModelConfig.from_args`) or, in tests and tools, from keyword arguments, where the
names of :class:`ImplConfig`'s fields are accepted next to the architecture's. Derived values
(head size, FFN size, K/V heads) come from :func:`derive_shape`, which
:mod:`megatron.initialize.argument_checks` uses too.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import torch

from megatron.errors import UsageError
from megatron.model.impl_config import ImplConfig

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def derive_shape(
    hidden_size: int,
    num_attention_heads: int,
    num_key_value_heads: int | None,
    kv_channels: int | None,
    ffn_hidden_size: int | None,
    swiglu: bool,
) -> tuple[int, int, int]:
    """(K/V heads, head size, FFN size) with Megatron's defaults; bad combinations are errors."""
    kv_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
    if num_attention_heads % kv_heads != 0:
        raise UsageError(
            f"--num-key-value-heads {kv_heads} does not divide --num-attention-heads {num_attention_heads}"
        )
    if kv_channels is None:
        if hidden_size % num_attention_heads != 0:
            raise UsageError(
                f"--hidden-size {hidden_size} is not divisible by --num-attention-heads "
                f"{num_attention_heads}; pass --kv-channels to set the head size"
            )
        kv_channels = hidden_size // num_attention_heads
    if ffn_hidden_size is None:
        # SwiGLU (Llama's rule): 2/3 of 4h, rounded up to a multiple of 64.
        ffn_hidden_size = (
            int(math.ceil(8 * hidden_size / 3 / 64) * 64) if swiglu else 4 * hidden_size
        )
    return kv_heads, kv_channels, ffn_hidden_size


@dataclass(frozen=True, init=False)
class ModelConfig:
    """Shape and style of a GPT model (what a checkpoint needs to rebuild it), and ``impl``.

    GPT-3 style by default (LayerNorm, GeLU, learned absolute positions, biases); Llama
    style with ``normalization="RMSNorm"``, ``swiglu=True``, ``position_embedding_type="rope"``,
    ``add_bias_linear=False`` and ``num_key_value_heads < num_attention_heads`` (GQA).
    ``ModelConfig(num_layers=2, ..., loss_chunk_size=0)`` puts ``loss_chunk_size`` in ``impl``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    seq_length: int
    max_position_embeddings: int = None  # type: ignore[assignment]  # default: seq_length
    # default: 4h, or Llama's 8h/3 rounded up to 64 (SwiGLU)
    ffn_hidden_size: int = None  # type: ignore[assignment]
    kv_channels: int = None  # type: ignore[assignment]  # head size; default hidden / heads
    # default: num_attention_heads (no GQA)
    num_key_value_heads: int = None  # type: ignore[assignment]
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_theta: float = 10000.0
    normalization: str = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    swiglu: bool = False
    openai_gelu: bool = False  # tanh-approximated GeLU (GPT-2's), instead of exact erf GeLU
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1
    init_method_std: float = 0.02
    params_dtype: torch.dtype = torch.float32  # from_args keeps fp32 (mixed precision: autocast)
    impl: ImplConfig = field(default_factory=ImplConfig)

    def __init__(self, *args: Any, impl: ImplConfig | None = None, **kwargs: Any) -> None:
        """Positional and keyword architecture fields; ImplConfig's field names go to ``impl``."""
        impl_names = {f.name for f in fields(ImplConfig)}
        impl = replace(impl or ImplConfig(), **{k: kwargs.pop(k) for k in impl_names & set(kwargs)})
        values = _bind([f for f in fields(self) if f.name != "impl"], args, kwargs)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
            if values[name] < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {values[name]}")
        if values["max_position_embeddings"] is None:
            values["max_position_embeddings"] = values["seq_length"]
        values["num_key_value_heads"], values["kv_channels"], values["ffn_hidden_size"] = (
            derive_shape(
                values["hidden_size"],
                values["num_attention_heads"],
                values["num_key_value_heads"],
                values["kv_channels"],
                values["ffn_hidden_size"],
                values["swiglu"],
            )
        )
        values["impl"] = impl.with_recompute_defaults(values["num_layers"])
        for name, value in values.items():  # a frozen dataclass's own __init__ does the same
            object.__setattr__(self, name, value)
        self._check_choices()

    def _check_choices(self) -> None:
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise UsageError(
                f"--position-embedding-type {self.position_embedding_type}: expected one of "
                f"{', '.join(POSITION_EMBEDDING_TYPES)}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise UsageError(f"--normalization {self.normalization}: expected LayerNorm or RMSNorm")
        if self.position_embedding_type == "rope":
            rot = self.rotary_dim
            if rot < 2 or rot % 2 != 0:
                raise UsageError(
                    f"--rotary-percent {self.rotary_percent} of head size {self.kv_channels} gives "
                    f"{rot} rotary channels; it must be an even number >= 2"
                )

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the rest pass through)."""
        return int(self.kv_channels * self.rotary_percent)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelConfig:
        """The model described by validated arguments (after ``validate_args`` and the tokenizer).

        Fast paths whose kernels cannot run on ``args.device_obj`` (when set) are turned off
        there, and listed once in the log."""
        padded_vocab = getattr(args, "padded_vocab_size", None)
        if padded_vocab is None:
            raise UsageError(
                "the vocabulary size is unknown: build the tokenizer (it sets padded_vocab_size) "
                "before the model"
            )
        impl = ImplConfig.from_args(args)
        device = getattr(args, "device_obj", None)
        if device is not None:
            impl = impl.for_device(torch.device(device))
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads,
            padded_vocab_size=padded_vocab,
            seq_length=args.seq_length,
            max_position_embeddings=args.max_position_embeddings,
            ffn_hidden_size=args.ffn_hidden_size,
            kv_channels=args.kv_channels,
            num_key_value_heads=args.num_key_value_heads,
            position_embedding_type=args.position_embedding_type or "learned_absolute",
            rotary_percent=args.rotary_percent,
            rotary_theta=args.rotary_position_embeddings_theta,
            normalization=args.normalization,
            layernorm_epsilon=args.layernorm_epsilon,
            swiglu=args.swiglu,
            openai_gelu=args.openai_gelu,
            add_bias_linear=args.add_bias_linear,
            untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
            attention_dropout=args.attention_dropout,
            hidden_dropout=args.hidden_dropout,
            init_method_std=args.init_method_std,
            # Parameters stay fp32: --bf16/--fp16 run the model under torch.autocast (the
            # training loop) and the optimizer steps the fp32 weights.
            params_dtype=torch.float32,
            impl=impl,
        )


def _bind(params: list, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``args`` and ``kwargs`` on the dataclass fields ``params``, defaults filled in."""
    if len(args) > len(params):
        raise TypeError(f"ModelConfig takes at most {len(params)} positional arguments")
    values = {f.name: a for f, a in zip(params, args)}
    for name, value in kwargs.items():
        if name in values or name not in {f.name for f in params}:
            raise TypeError(f"ModelConfig got an unexpected or repeated argument {name!r}")
        values[name] = value
    for f in params:
        if f.name not in values:
            if f.default is MISSING:
                raise TypeError(f"ModelConfig is missing the argument {f.name!r}")
            values[f.name] = f.default
    return values
