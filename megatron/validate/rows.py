"""What ``python -m megatron.validate`` checks: two small models and the configurations (rows).

Every row is one forward + backward of a small GPT-3-style or Llama-style model, compared
with the same weights and batch computed in fp32 by the plainest path (classic attention, no
fast path, one process). A row names the switches it turns on (``overrides`` of
:class:`~megatron.model.ModelConfig`) and the kernels that must be seen running (``expect``,
see :mod:`megatron.validate.gradcheck`). The ``classic`` row of each model, the classic
backend under bf16 autocast with no fast path, is the noise baseline that sets the tolerances.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# The plainest configuration: every fast path and implementation switch off, no dropout.
PLAIN = {
    "attention_backend": "classic",
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "sdpa_block_size": 0,
    "loss_chunk_size": 0,
    "cross_entropy_fusion": False,
    "loss_grad_in_forward": False,
    "embedding_grads_in_place": False,
    "bias_gelu_fusion": False,
    "fused_residual_norm": False,
    "bias_dropout_fusion": False,
    "fp32_residual_connection": False,
    "delay_wgrad_compute": False,
    "recompute_granularity": None,
    "checkpoint_in_cpu": False,
    "sp_rank_major_qkv": False,
    "tiled_mlp_chunk_size": 0,
}

# Model shapes per device kind: (common, GPT-3 style, Llama style, batch size).
GPU_COMMON = {"num_layers": 2, "hidden_size": 512, "padded_vocab_size": 2048, "seq_length": 4096}
CPU_COMMON = {"num_layers": 2, "hidden_size": 256, "padded_vocab_size": 256, "seq_length": 64}
GPT = {"num_attention_heads": 4}  # head size 128 (GPU), 64 (CPU); LayerNorm, GeLU, biases
LLAMA = {
    "num_attention_heads": 8,  # head size 64 (GPU), 32 (CPU): CPU rows keep 4 heads, below
    "num_key_value_heads": 2,
    "position_embedding_type": "rope",
    "normalization": "RMSNorm",
    "swiglu": True,
    "add_bias_linear": False,
    "untie_embeddings_and_output_weights": True,
}
BATCH = 2
LOSS_CHUNK = 1024  # tokens per chunk of the chunked loss (GPU); CPU rows use a quarter


def model_shape(model: str, device_type: str) -> dict:
    """ModelConfig fields of ``model`` ("gpt" or "llama") on ``device_type``."""
    common = dict(GPU_COMMON if device_type == "cuda" else CPU_COMMON)
    style = dict(GPT if model == "gpt" else LLAMA)
    if device_type != "cuda" and model == "llama":
        style["num_attention_heads"] = 4  # head size 64: the Triton kernel's smallest
    return {**common, **style}


@dataclass(frozen=True)
class Row:
    """One checked configuration.

    ``expect``: kernel tokens that must be seen (:data:`megatron.validate.gradcheck.TOKENS`);
    the attention kernel among them is the only attention kernel allowed to run.
    ``sp``: sequence-parallel size (rows with ``sp`` > 1 run under ``torchrun`` only).
    """

    name: str
    model: str
    overrides: dict = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    packed: bool = False
    micro_batches: int = 1
    sp: int = 1  # ranks that share one sequence (SP rows: Ulysses; ring rows: the ring)
    ring: bool = False  # the ``sp`` ranks run ring attention (--context-parallel-size)
    flash_attn: bool = False  # the sdpa backend with the flash_attn package (else torch SDPA)
    # then one AdamW step with the state on the host against the same step on the device
    optimizer_offload: bool = False
    fused_dq: bool = False  # the Triton backward with dQ in the dK/dV kernel
    step_blocks: int = 0  # > 0: attention by the backend's step over this many blocks


def _attention(backend: str, model: str, packed: bool, device_type: str) -> str:
    """The attention kernel token each backend must run for this model and mask."""
    if backend == "classic":
        return "classic"
    if backend == "triton":
        return "triton"
    if backend == "flash_attn":
        return "flash_attn"
    if device_type != "cuda":
        return "cpu-flash"  # PyTorch's fused CPU kernel, also with a document mask
    # torch SDPA on CUDA: torch 2.11 with cuDNN 9.19 picks cuDNN for causal attention, also
    # with GQA (measured on an H100; see docs/validation.md). Packed documents take the
    # Triton kernel (megatron.ops.attention_choice), never a dense mask.
    if packed:
        return "triton"
    return "cudnn"


def _rope_expected(rows: list[Row]) -> list[Row]:
    """Llama rows rotate q and k (RoPE, one Triton pass on CUDA): that must be seen too."""
    return [replace(r, expect=(*r.expect, "rope")) if r.model == "llama" else r for r in rows]


def single_gpu_rows(device_type: str) -> list[Row]:
    """Rows for one process: backends, packed documents, each fast path alone, all together."""
    rows: list[Row] = []
    chunk = LOSS_CHUNK if device_type == "cuda" else LOSS_CHUNK // 64
    seq = (GPU_COMMON if device_type == "cuda" else CPU_COMMON)["seq_length"]
    # Triton kernels launched in the CPU interpreter leave no trace; bias-GeLU is Triton on
    # CUDA only (PyTorch's ops elsewhere).
    triton_ce = ("ce-fused",) if device_type == "cuda" else ()
    bias_gelu = ("bias-gelu",) if device_type == "cuda" else ()
    for m in ("gpt", "llama"):

        def att(backend: str, packed: bool = False, m: str = m) -> str:
            return _attention(backend, m, packed, device_type)

        rows += [
            Row(f"{m}/classic", m, {}, ("classic",)),
            Row(f"{m}/sdpa", m, {"attention_backend": "sdpa"}, (att("sdpa"),)),
            Row(
                f"{m}/sdpa-blockwise",
                m,
                {"attention_backend": "sdpa", "sdpa_block_size": seq // 4},
                ("blockwise", att("sdpa")),
            ),
            Row(f"{m}/triton", m, {"attention_backend": "triton"}, ("triton",)),
            Row(
                f"{m}/flash_attn",
                m,
                {"attention_backend": "sdpa"},
                ("flash_attn",),
                flash_attn=True,
            ),
            Row(f"{m}/classic+docs", m, {}, ("classic",), packed=True),
            Row(
                f"{m}/sdpa+docs",
                m,
                {"attention_backend": "sdpa"},
                (att("sdpa", True),),
                packed=True,
            ),
            Row(f"{m}/triton+docs", m, {"attention_backend": "triton"}, ("triton",), packed=True),
            Row(
                f"{m}/triton-fused-dq+docs",
                m,
                {"attention_backend": "triton"},
                ("triton", "triton-fused-dq") if device_type != "cuda" else ("triton-fused-dq",),
                packed=True,
                fused_dq=True,
            ),
            Row(
                f"{m}/triton-step+docs",
                m,
                {"attention_backend": "triton"},
                ("triton-step",),
                packed=True,
                step_blocks=4,
            ),
            Row(
                f"{m}/flash_attn+docs",
                m,
                {"attention_backend": "sdpa"},
                ("flash_attn",),
                packed=True,
                flash_attn=True,
            ),
            Row(f"{m}/fused-norm", m, {"fused_residual_norm": True}, ("classic", "add-norm")),
        ]
        if m == "gpt":  # biases: the output biases' add moves into the fused norm; bias-GeLU
            rows += [
                Row(
                    "gpt/fused-norm+bias",
                    m,
                    {"fused_residual_norm": True, "bias_dropout_fusion": True},
                    ("classic", "add-norm"),
                ),
                Row("gpt/bias-gelu", m, {"bias_gelu_fusion": True}, ("classic", *bias_gelu)),
            ]
        grads_in_fwd = {"loss_chunk_size": chunk, "loss_grad_in_forward": True}
        in_place = {**grads_in_fwd, "embedding_grads_in_place": True}
        recompute_full = {"recompute_granularity": "full"}
        rows += [
            Row(f"{m}/chunked-loss", m, {"loss_chunk_size": chunk}, ("classic",)),
            Row(f"{m}/loss-grad-in-forward", m, grads_in_fwd, ("classic",)),
            Row(
                f"{m}/ce-fusion",
                m,
                {"loss_chunk_size": chunk, "cross_entropy_fusion": True},
                ("classic", *triton_ce),
            ),
            Row(f"{m}/in-place-grads", m, in_place, ("classic", "in-place-grads")),
            Row(
                f"{m}/grad-accum-2mb",
                m,
                in_place,
                ("classic", "in-place-grads"),
                micro_batches=2,
            ),
            Row(f"{m}/fp32-residual", m, {"fp32_residual_connection": True}, ("classic",)),
            Row(f"{m}/recompute-full", m, recompute_full, ("classic",)),
            Row(
                f"{m}/recompute-selective", m, {"recompute_granularity": "selective"}, ("classic",)
            ),
            Row(
                f"{m}/checkpoint-in-cpu",
                m,
                {**recompute_full, "checkpoint_in_cpu": True},
                ("classic", "host-offload") if device_type == "cuda" else ("classic",),
            ),
            Row(f"{m}/tiled-mlp", m, {"tiled_mlp_chunk_size": seq // 4}, ("classic", "tiled-mlp")),
            # The long-context settings together: tiled MLP, recompute, activation and
            # optimizer offload (--cpu-optimizer).
            Row(
                f"{m}/long-context-offload",
                m,
                {
                    **recompute_full,
                    "checkpoint_in_cpu": True,
                    "tiled_mlp_chunk_size": seq // 4,
                    "attention_backend": "sdpa",
                },
                (att("sdpa"), "tiled-mlp", "host-optimizer")
                + (("host-offload",) if device_type == "cuda" else ()),
                optimizer_offload=True,
            ),
        ]
        # All together, as the example launch scripts run them (FUSED=1, recompute).
        fused = {
            **in_place,
            **recompute_full,
            "fused_residual_norm": True,
            "bias_dropout_fusion": True,
            "bias_gelu_fusion": True,
            "cross_entropy_fusion": True,
        }
        fused_tokens = ("add-norm", "in-place-grads", *triton_ce) + (
            bias_gelu if m == "gpt" else ()
        )
        rows += [
            Row(
                f"{m}/all-sdpa",
                m,
                {**fused, "attention_backend": "sdpa"},
                (att("sdpa"), *fused_tokens),
                micro_batches=2,
            ),
            Row(
                f"{m}/all-triton+docs",
                m,
                {**fused, "attention_backend": "triton"},
                ("triton", *fused_tokens),
                packed=True,
                micro_batches=2,
            ),
        ]
    return _rope_expected(rows)


def sp_rows(world_size: int, device_type: str) -> list[Row]:
    """Rows for ``world_size`` > 1 processes: SP 2 and SP ``world_size`` against SP 1,
    including the switches that only act under sequence parallelism."""
    rows: list[Row] = []
    sizes = sorted({2, world_size}) if world_size > 1 else []
    for sp in sizes:
        for m in ("gpt", "llama"):
            sdpa = {"attention_backend": "sdpa"}
            att = _attention("sdpa", m, False, device_type)
            rows += [
                Row(f"{m}/sp{sp}", m, {}, ("classic", "all-to-all"), sp=sp),
                Row(f"{m}/sp{sp}-sdpa", m, sdpa, (att, "all-to-all"), sp=sp),
                Row(
                    f"{m}/sp{sp}-triton+docs",
                    m,
                    {"attention_backend": "triton"},
                    ("triton", "all-to-all"),
                    packed=True,
                    sp=sp,
                ),
                Row(
                    f"{m}/sp{sp}-delay-wgrad",
                    m,
                    {**sdpa, "delay_wgrad_compute": True},
                    (att, "all-to-all", "delayed-wgrad"),
                    sp=sp,
                ),
            ]
            if m == "gpt":  # send-order Q/K/V needs learned positions (RoPE rotates first)
                rows.append(
                    Row(
                        f"gpt/sp{sp}-rank-major-qkv",
                        m,
                        {**sdpa, "sp_rank_major_qkv": True},
                        (att, "rank-major"),
                        sp=sp,
                    )
                )
            # Ring attention over the same ranks (--context-parallel-size), load-balanced
            rows += [
                Row(f"{m}/ring{sp}-sdpa", m, sdpa, (att, "ring"), sp=sp, ring=True),
                Row(
                    f"{m}/ring{sp}-sdpa+docs",
                    m,
                    sdpa,
                    # documents: the SDPA step hands them to the Triton kernels on CUDA; on
                    # CPU the classic step runs (plain tensor ops, no kernel name to check)
                    ("triton-kernels", "ring") if device_type == "cuda" else ("ring",),
                    packed=True,
                    sp=sp,
                    ring=True,
                ),
            ]
    return _rope_expected(rows)
