"""ModelConfig: every architecture choice of the GPT model in one validated dataclass.

The parsed command line is the one source of truth (:meth:`ModelConfig.from_args`); tests
build the dataclass directly. Derived values (head size, FFN size, K/V heads) are filled in
by :func:`derive_shape`, which :mod:`megatron.initialize.argument_checks` uses too.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from megatron.errors import UsageError

ATTENTION_BACKENDS = ("classic", "sdpa", "triton")
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


@dataclass
class ModelConfig:
    """Shape, style and training-time behaviour of a GPT model.

    GPT-3 style by default (LayerNorm, GeLU, learned absolute positions, biases); Llama
    style with ``normalization="RMSNorm"``, ``swiglu=True``, ``position_embedding_type="rope"``,
    ``add_bias_linear=False`` and ``num_key_value_heads < num_attention_heads`` (GQA).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    seq_length: int
    max_position_embeddings: int | None = None  # default: seq_length
    ffn_hidden_size: int | None = None  # default: 4h, or Llama's 8h/3 rounded up to 64 (SwiGLU)
    kv_channels: int | None = None  # head size; default hidden / heads
    num_key_value_heads: int | None = None  # default: num_attention_heads (no GQA)
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
    attention_backend: str = "classic"  # classic | sdpa | triton
    # sdpa: causal attention over at least 2 blocks of this many tokens (per rank) runs as
    # square blocks (megatron.model.blockwise_attention); 0: one kernel call.
    sdpa_block_size: int = 65536
    loss_chunk_size: int = 2048  # tokens per output-layer + cross-entropy chunk; 0: unchunked
    cross_entropy_fusion: bool = False  # chunked loss: one Triton pass per chunk (CUDA)
    loss_grad_in_forward: bool = True  # chunked loss given the mask: gradients in forward
    # Embedding and (in-forward) output-layer gradients added into .grad in place; for
    # .backward() only (torch.autograd.grad does not see them): training turns it on.
    embedding_grads_in_place: bool = False
    bias_gelu_fusion: bool = False  # GeLU MLP: fc1's bias add + GeLU in one pass (CUDA)
    fused_residual_norm: bool = False  # each residual add + the norm after it (Triton)
    bias_dropout_fusion: bool = True  # with it, no dropout: output biases added in that pass
    fp32_residual_connection: bool = False  # else the stream is autocast's dtype (bf16/fp16)
    delay_wgrad_compute: bool = False  # SP: weight gradients during the backward all-to-alls
    recompute_granularity: str | None = None  # None | "full" | "selective"
    recompute_method: str | None = None  # "uniform" | "block" (full only)
    recompute_num_layers: int | None = None
    checkpoint_in_cpu: bool = False  # full recompute only: checkpointed inputs wait in host memory
    sp_overlap_chunks: int = 1  # Ulysses all-to-alls pipelined over this many head groups
    sp_rank_major_qkv: bool = True  # SP: Q/K/V projected straight into the send layout
    torch_compile: bool = False  # torch.compile each layer (attention core excluded)
    params_dtype: torch.dtype = torch.float32  # from_args keeps fp32 (mixed precision: autocast)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size"):
            if getattr(self, name) < 1:
                raise UsageError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        self.num_key_value_heads, self.kv_channels, self.ffn_hidden_size = derive_shape(
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.kv_channels,
            self.ffn_hidden_size,
            self.swiglu,
        )
        self._check_choices()
        self._check_recompute()
        if self.loss_chunk_size < 0:
            raise UsageError(f"--loss-chunk-size {self.loss_chunk_size} must be >= 0")
        if self.sdpa_block_size < 0:
            raise UsageError(f"--sdpa-block-size {self.sdpa_block_size} must be >= 0")

    def _check_choices(self) -> None:
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise UsageError(
                f"--position-embedding-type {self.position_embedding_type}: expected one of "
                f"{', '.join(POSITION_EMBEDDING_TYPES)}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise UsageError(f"--normalization {self.normalization}: expected LayerNorm or RMSNorm")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UsageError(
                f"attention backend {self.attention_backend!r}: expected one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.position_embedding_type == "rope":
            rot = self.rotary_dim
            if rot < 2 or rot % 2 != 0:
                raise UsageError(
                    f"--rotary-percent {self.rotary_percent} of head size {self.kv_channels} gives "
                    f"{rot} rotary channels; it must be an even number >= 2"
                )

    def _check_recompute(self) -> None:
        g = self.recompute_granularity
        if g not in (None, "full", "selective"):
            raise UsageError(f"--recompute-granularity {g}: expected full or selective")
        if g == "full":
            self.recompute_method = self.recompute_method or "uniform"
            self.recompute_num_layers = self.recompute_num_layers or 1
            if self.recompute_method not in ("uniform", "block"):
                raise UsageError(
                    f"--recompute-method {self.recompute_method}: expected uniform or block"
                )
            if not 1 <= self.recompute_num_layers <= self.num_layers:
                raise UsageError(
                    f"--recompute-num-layers {self.recompute_num_layers} must be between 1 and "
                    f"--num-layers {self.num_layers}"
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
        """The model described by validated arguments (after ``validate_args`` and the tokenizer)."""
        padded_vocab = getattr(args, "padded_vocab_size", None)
        if padded_vocab is None:
            raise UsageError(
                "the vocabulary size is unknown: build the tokenizer (it sets padded_vocab_size) "
                "before the model"
            )
        if args.use_flash_attn and args.use_flash_attn_triton:
            raise UsageError(
                "--use-flash-attn and --use-flash-attn-triton were both given; choose one"
            )
        backend = (
            "triton" if args.use_flash_attn_triton else "sdpa" if args.use_flash_attn else "classic"
        )
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
            attention_backend=backend,
            sdpa_block_size=args.sdpa_block_size,
            loss_chunk_size=args.loss_chunk_size,
            cross_entropy_fusion=args.cross_entropy_loss_fusion,
            loss_grad_in_forward=not args.no_loss_grad_in_forward,
            embedding_grads_in_place=not args.no_embedding_grads_in_place,
            # --torch-compile fuses the layer's pointwise work itself.
            bias_gelu_fusion=not (args.no_bias_gelu_fusion or args.torch_compile),
            fused_residual_norm=args.fused_residual_norm,
            bias_dropout_fusion=not args.no_bias_dropout_fusion,
            fp32_residual_connection=args.fp32_residual_connection,
            delay_wgrad_compute=args.delay_wgrad_compute,
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
            checkpoint_in_cpu=args.checkpoint_in_cpu,
            sp_overlap_chunks=args.sp_overlap_chunks,
            sp_rank_major_qkv=not args.no_sp_rank_major_qkv,
            torch_compile=args.torch_compile,
            # Parameters stay fp32: --bf16/--fp16 run the model under torch.autocast (the
            # training loop) and the optimizer steps the fp32 weights.
            params_dtype=torch.float32,
        )
