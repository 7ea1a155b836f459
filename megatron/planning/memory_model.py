"""Predicted per-GPU training memory, modelled on the tensors THIS code base keeps.

Pure functions of a :class:`~megatron.model.ModelConfig` and a :class:`RunSetup`; every
number is bytes, for one GPU, as ``torch.cuda.max_memory_allocated`` would count it (no
CUDA context, NCCL or allocator fragmentation: leave headroom for those).

What the model follows (read from the code, checked by ``tests/test_estimate_memory.py``):

* Parameters are fp32 (``ModelConfig.from_args``); ``--bf16/--fp16`` run under autocast,
  whose cast cache keeps a low-precision copy of every linear weight used in forward (saved
  for backward; with full recompute only until forward ends, then one group at a time).
  Under ZeRO the transformer layers' weights are all-gathered in the compute dtype instead
  (FSDP2 ``MixedPrecisionPolicy``; ``--fp32-param-gather`` keeps fp32): no autocast copies
  of them, and a layer's backward holds its low-precision gradients until FSDP2 copies them
  into its fp32 reduce-scatter buffer. The root module (embeddings, final norm, output
  layer) stays fp32, so the output layer's autocast copy remains.
* The residual stream is in the compute dtype under bf16/fp16 (fp32 with
  ``--fp32-residual-connection``); each norm keeps its input upcast to fp32 and its
  statistics (the fused add + norm, on CUDA: the residual in its dtype); every linear
  keeps its (compute-dtype) input; local attention keeps q, k, v, the output and the fp32
  log-sum-exp (``sdpa``/``triton``) or the ``[b, h/p, s, s]`` fp32 probabilities (``classic``).
* Under SP the saved q/k/v are the all-to-all's receive buffer (K/V heads replicated up to
  ``p`` when fewer), and the context is copied once more on its way back to ``[s/p, b, h]``.
* Under ring attention (``cp`` > 1) each rank holds ``s / (sp cp)`` tokens; the local
  attention keeps q, k, v, the merged output and log-sum-exp whatever the backend (a step's
  probabilities never outlive it), and its backward adds the K/V block in flight and the
  fp32 dK/dV accumulators that travel with it (received, accumulating, being sent).
* ZeRO via FSDP2 over all GPUs (SP x CP x DP): stages 1/2 keep the all-gathered weights
  from forward to backward; stage 3 holds the root module (embeddings, final norm) plus
  about two layers unsharded. Stage 1 over several micro-batches keeps every gradient
  unsharded in fp32 until the step's last micro-batch reduces it. AdamW keeps two fp32
  states (and a step scalar) per tensor.
* ``--tiled-mlp-chunk-size``: the MLP saves only its input; its backward holds one tile's
  recomputed intermediates and gradients, the input gradient and a tile's weight gradients.
* Host offload: ``--cpu-optimizer`` takes AdamW's states off the GPU (the host holds them,
  an fp32 parameter copy and a gradient buffer); ``--cpu-offload-params`` (FSDP2) also the
  sharded parameters and gradients. ``--checkpoint-in-cpu`` keeps the group inputs on the
  host; two are on the GPU in backward (the one recomputed and the next, fetched ahead).
  ``MemoryEstimate.host`` is the pinned host memory of one GPU's process.
* The chunked loss, given the loss mask as in training, computes its gradients in forward
  and keeps them (fp32 weight and hidden-state gradients) until backward; without the
  mask's in-forward path it keeps the final hidden states (fp32; the residual's dtype after
  the fused final norm). Its transient is one chunk's logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from megatron.core.sequence.heads import check_heads_for_sp, head_split
from megatron.data.batch import padded_seq_length, sequence_shard_unit
from megatron.errors import UsageError
from megatron.model.config import ModelConfig

GIB = 2**30
PRECISIONS = {"bf16": 2, "fp16": 2, "fp32": 4}
MISC_BYTES_PER_TOKEN = 16  # labels copy and per-token losses (int64 / fp32)


@dataclass(frozen=True)
class RunSetup:
    """How the model is trained: GPUs, Ulysses (``sp``) and ring (``cp``) degrees,
    micro-batch, ZeRO stage, precision.

    ``device="cpu"`` switches the details that differ on CPU (dropout masks have the input's
    dtype instead of bool; RMSNorm is composed of ops that keep ``x * rstd``; gloo's
    reduce-scatter works on a full-size copy of its input).
    ``fp32_param_gather`` is ``--fp32-param-gather`` (changes only ZeRO with bf16/fp16).
    ``num_micro_batches`` per step matters only for ZeRO 1, whose gradients wait unsharded
    in fp32 until the step's last micro-batch."""

    num_gpus: int = 1
    sp: int = 1
    micro_batch_size: int = 1
    cp: int = 1
    zero_stage: int = 0
    precision: str = "bf16"
    device: str = "cuda"
    fp32_param_gather: bool = False
    num_micro_batches: int = 1
    optimizer_offload: bool = False  # --cpu-optimizer: AdamW state + fp32 copy on the host
    param_offload: bool = False  # --cpu-offload-params: FSDP2 keeps shards on the host

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision {self.precision!r}: expected bf16, fp16 or fp32")
        if self.zero_stage not in (0, 1, 2, 3):
            raise UsageError(f"--zero-stage {self.zero_stage}: expected 0, 1, 2 or 3")
        if self.sp < 1 or self.num_gpus % self.sp != 0:
            raise UsageError(
                f"--ds-sequence-parallel-size {self.sp} must divide --num-gpus {self.num_gpus}"
            )
        if self.cp < 1 or self.num_gpus % (self.sp * self.cp) != 0:
            raise UsageError(
                f"--ds-sequence-parallel-size {self.sp} x --context-parallel-size {self.cp} must "
                f"divide --num-gpus {self.num_gpus}"
            )
        if self.micro_batch_size < 1:
            raise UsageError(f"--micro-batch-size {self.micro_batch_size} must be >= 1")
        if self.num_micro_batches < 1:
            raise UsageError(f"{self.num_micro_batches} micro-batches per step: must be >= 1")
        if self.param_offload and self.zero_stage != 3:
            raise UsageError("--cpu-offload-params needs --zero-stage 3")

    @property
    def compute_bytes(self) -> int:
        return PRECISIONS[self.precision]

    @property
    def lowp_layer_params(self) -> bool:
        """True when ZeRO all-gathers the transformer layers' weights in the compute dtype."""
        return self.zero_stage > 0 and self.compute_bytes < 4 and not self.fp32_param_gather

    @property
    def layer_param_bytes(self) -> int:
        """Bytes per element of a layer's unsharded weights and their gradients."""
        return self.compute_bytes if self.lowp_layer_params else 4


@dataclass
class MemoryEstimate:
    """Peak per-GPU bytes by component, at the phase of the iteration where the sum peaks."""

    params: int  # fp32 master weights this GPU stores (all, or its ZeRO shard)
    params_unsharded: int  # FSDP2 all-gathered weights alive at the peak (ZeRO 1-3)
    params_lowp: int  # autocast bf16/fp16 weight copies alive at the peak
    grads: int  # fp32 gradients alive at the peak
    optimizer: int  # AdamW exp_avg + exp_avg_sq (+ step scalars)
    activations: int  # tensors saved for backward (incl. a recomputed group) at the peak
    attention_workspace: int  # local attention's backward buffers (dq/dk/dv, s^2 for classic)
    all_to_all: int  # Ulysses send/receive buffers of one attention call
    logits: int  # loss-chunk logits and the output layer's transient weight copy/gradient
    working: int  # other backward temporaries of one layer (activation gradients)
    total: int
    peak_phase: str
    activations_per_layer: int  # saved by one layer without recompute
    activations_saved: int  # everything saved at the end of forward
    tokens_per_gpu: int
    details: dict = field(default_factory=dict)
    host: int = 0  # host memory of this GPU's process: offloaded states and activations

    COMPONENTS = (
        "params",
        "params_unsharded",
        "params_lowp",
        "grads",
        "optimizer",
        "activations",
        "attention_workspace",
        "all_to_all",
        "logits",
        "working",
    )

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- parameters


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of ``GPTModel(config)`` (same names, same order)."""
    h, d, v = config.hidden_size, config.kv_channels, config.padded_vocab_size
    hq, hkv, ffn = config.num_attention_heads, config.num_key_value_heads, config.ffn_hidden_size
    up = 2 * ffn if config.swiglu else ffn
    qkv = (hq + 2 * hkv) * d
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (v, h)}
    if config.position_embedding_type == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (config.max_position_embeddings, h)

    def norm(prefix: str) -> None:
        shapes[f"{prefix}.weight"] = (h,)
        if config.normalization == "LayerNorm":
            shapes[f"{prefix}.bias"] = (h,)

    def linear(prefix: str, out_f: int, in_f: int) -> None:
        shapes[f"{prefix}.weight"] = (out_f, in_f)
        if config.add_bias_linear:
            shapes[f"{prefix}.bias"] = (out_f,)

    for i in range(config.num_layers):
        p = f"transformer.layers.{i}"
        norm(f"{p}.input_layernorm")
        linear(f"{p}.self_attention.query_key_value", qkv, h)
        linear(f"{p}.self_attention.dense", h, hq * d)
        norm(f"{p}.post_attention_layernorm")
        linear(f"{p}.mlp.dense_h_to_4h", up, h)
        linear(f"{p}.mlp.dense_4h_to_h", h, ffn)
    norm("transformer.final_layernorm")
    if config.untie_embeddings_and_output_weights:
        shapes["output_layer"] = (v, h)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _shard_numel(shape: tuple[int, ...], ways: int) -> int:
    """FSDP2's per-rank shard: dim 0 split in ``ways`` chunks, padded to the largest."""
    return -(-shape[0] // ways) * _numel(shape[1:])


def _is_linear(name: str) -> bool:
    return ".self_attention." in name or ".mlp." in name


# ---------------------------------------------------------------------------- activations


def _seq(config: ModelConfig, setup: RunSetup) -> int:
    """The sequence length as computed: padded to split over the Ulysses and ring ranks."""
    return padded_seq_length(config.seq_length, sequence_shard_unit(setup.sp, setup.cp))


def _dims(config: ModelConfig, setup: RunSetup) -> dict:
    p = setup.sp
    hkv = config.num_key_value_heads
    # The rank with the most heads (uneven splits: ceil(h/p)); K/V heads as sent (copies
    # where ranks share one): p x that rank's counts is the widths' per-token equivalent.
    split = head_split(config.num_attention_heads, hkv, p)
    q_max, kv_max = max(split.q_counts), max(split.kv_counts)
    return {
        "n": setup.micro_batch_size * _seq(config, setup) // (p * setup.cp),  # local tokens
        "a": setup.compute_bytes,
        "h": config.hidden_size,
        "hd": config.num_attention_heads * config.kv_channels,  # query width
        "hds": p * q_max * config.kv_channels,  # query width, head-sharded (per-token equivalent)
        "x": p * (q_max + 2 * kv_max) * config.kv_channels,  # q+k+v width, head-sharded
        "kvd": hkv * config.kv_channels,
        "ffn": config.ffn_hidden_size,
        "up": 2 * config.ffn_hidden_size if config.swiglu else config.ffn_hidden_size,
        "p": p,
    }


def residual_bytes(config: ModelConfig, setup: RunSetup) -> int:
    """Bytes per element of the residual stream (and of recomputed groups' inputs)."""
    if config.impl.fp32_residual_connection or setup.compute_bytes == 4:
        return 4
    return setup.compute_bytes


def _fused_norm_runs(config: ModelConfig, setup: RunSetup) -> bool:
    """The fused add + norm runs on CUDA (on CPU only in the Triton interpreter: unfused)."""
    return config.impl.fused_residual_norm and setup.device == "cuda"


def final_hidden_bytes(config: ModelConfig, setup: RunSetup) -> int:
    """Bytes per element of the final norm's output: the residual's dtype when fused, else fp32."""
    return residual_bytes(config, setup) if _fused_norm_runs(config, setup) else 4


def _norm_bytes_per_token(config: ModelConfig, setup: RunSetup) -> int:
    """One norm: its input in fp32 and its statistics (composite RMSNorm on CPU also keeps
    x * rstd); fused with the residual add, the residual in its own dtype instead."""
    h = config.hidden_size
    if _fused_norm_runs(config, setup):
        return residual_bytes(config, setup) * h + 8
    if config.normalization == "LayerNorm":
        return 4 * h + 8
    return 4 * h + 4 + (4 * h if setup.device == "cpu" else 0)


def _classic_square_bytes(config: ModelConfig, setup: RunSetup, a: int) -> int:
    """Per layer: the [b, h/p, s, s] tensors classic attention keeps, and its [s, s] mask."""
    s, b = _seq(config, setup), setup.micro_batch_size
    per_elem = 4  # softmax output (fp32)
    if config.attention_dropout > 0:
        per_elem += 1 if setup.device == "cuda" else 4  # dropout mask
        per_elem += 4 if a == 4 else a  # dropped probs (fp32) or their compute-dtype cast
    elif a != 4:
        per_elem += a  # probs cast to the compute dtype for P @ V
    q_max = max(
        head_split(config.num_attention_heads, config.num_key_value_heads, setup.sp).q_counts
    )
    return b * q_max * s * s * per_elem + s * s


def mlp_tile(config: ModelConfig, setup: RunSetup) -> int:
    """Tokens per tile of the tiled MLP (0: untiled, also when one tile holds them all)."""
    chunk = config.impl.tiled_mlp_chunk_size
    return chunk if 0 < chunk < _seq(config, setup) // (setup.sp * setup.cp) else 0


MLP_SAVED_KEYS = ("mlp_norm", "fc1_input", "fc1_output", "fc2_input", "mlp_dropout_mask")


def layer_saved_bytes(config: ModelConfig, setup: RunSetup) -> dict[str, int]:
    """Bytes one transformer layer saves for backward (no recompute, or selective), by tensor.

    The keys in :data:`MLP_SAVED_KEYS` belong to the MLP half, freed before attention's
    backward runs; the others to the attention half."""
    g = _dims(config, setup)
    n, a, h, hd, x, ffn, up, p = (g[k] for k in ("n", "a", "h", "hd", "x", "ffn", "up", "p"))
    selective = config.impl.recompute_granularity == "selective"
    norm = n * _norm_bytes_per_token(config, setup)
    out: dict[str, int] = {"attn_norm": norm, "qkv_input": n * a * h}
    if config.impl.attention_backend == "classic" and not selective and setup.cp == 1:
        # q and k upcast to fp32 (k expanded over the GQA group), v expanded, context copy.
        hds = g["hds"]
        out["attention_inputs"] = n * (8 * hds + a * hds)
        out["attention_scores"] = _classic_square_bytes(config, setup, a)
        out["context"] = n * a * hds
    else:
        # q/k/v as saved: the QKV output at SP 1 (with RoPE: the rotated buffer that replaces
        # it), else the receive buffer.
        out["attention_inputs"] = n * a * x
        # Kept output and fp32 log-sum-exp, unless recomputed (selective); the dense layer's
        # input is a view of the output at SP 1 and a copy after the all-to-all under SP.
        keep_out = not selective
        out["attention_scores"] = 4 * n * g["hds"] // config.kv_channels if keep_out else 0
        out["context"] = n * a * (g["hds"] + (hd if keep_out and p > 1 else 0))
    mask = n * h * (1 if setup.device == "cuda" else a) if config.hidden_dropout > 0 else 0
    out["attn_dropout_mask"] = mask
    out["mlp_norm"] = norm
    if mlp_tile(config, setup):  # the tiled MLP keeps only its input, in the compute dtype
        out["fc1_input"] = n * a * h
        out["fc1_output"] = out["fc2_input"] = 0
    else:
        out["fc1_input"] = n * a * h
        out["fc1_output"] = n * a * up  # GeLU input, or SwiGLU's gate|up
        out["fc2_input"] = n * a * ffn * (2 if config.swiglu else 1)  # (+ SwiGLU's silu output)
    out["mlp_dropout_mask"] = mask
    return out


def saved_activation_bytes(config: ModelConfig, setup: RunSetup) -> dict[str, int]:
    """Everything the forward pass leaves saved for backward (parameters and their casts aside).

    Keys: ``layers`` (all layers, after recompute), ``per_layer`` (one layer without full
    recompute), ``final`` (final norm and loss inputs), ``shared`` (RoPE tables, labels, masks).
    """
    g = _dims(config, setup)
    n, a, h = g["n"], g["a"], g["h"]
    per_layer = sum(layer_saved_bytes(config, setup).values())
    L = config.num_layers
    if config.impl.recompute_granularity == "full":
        k = config.impl.recompute_num_layers
        # each group's input (the residual stream)
        kept = 0 if inputs_on_host(config, setup) else residual_bytes(config, setup) * n * h
        if config.impl.recompute_method == "block":
            layers = k * kept + (L - k) * per_layer
        else:
            layers = math.ceil(L / k) * kept
    else:
        layers = L * per_layer
    # Final norm: its input; the chunked loss keeps its output, or its fp32 gradients.
    final = n * _norm_bytes_per_token(config, setup)
    if loss_grads_in_forward(config):
        final += 4 * config.padded_vocab_size * h + 4 * n * h
    elif config.impl.loss_chunk_size > 0:
        final += final_hidden_bytes(config, setup) * n * h
    else:
        final += n * a * h + 4 * n * config.padded_vocab_size  # + fp32 log-softmax
    shared = MISC_BYTES_PER_TOKEN * n
    if config.position_embedding_type == "rope":
        shared += 2 * 4 * n * config.rotary_dim  # cos and sin, fp32
    if config.hidden_dropout > 0:
        shared += n * h * (1 if setup.device == "cuda" else 4)  # embedding dropout mask
    return {"layers": layers, "per_layer": per_layer, "final": final, "shared": shared}


def lowp_weight_bytes(config: ModelConfig, setup: RunSetup, layers: int | None = None) -> int:
    """Autocast's low-precision copies of the linear weights of ``layers`` layers (all by
    default), which the linears save for backward. (Bias copies are not saved: ignored.)
    0 when ZeRO gathers the layers' weights in the compute dtype: they are used as is."""
    if setup.compute_bytes == 4 or setup.lowp_layer_params:
        return 0
    shapes = parameter_shapes(config)
    per_model = sum(
        _numel(s) for name, s in shapes.items() if _is_linear(name) and name.endswith(".weight")
    )
    per_layer = per_model // config.num_layers
    return setup.compute_bytes * per_layer * (config.num_layers if layers is None else layers)


def output_weight_copy_bytes(config: ModelConfig, setup: RunSetup) -> int:
    """The output layer's compute-dtype weight: saved (autocast cache) by the unchunked loss,
    a transient of each pass of the chunked one."""
    a = setup.compute_bytes
    return a * config.padded_vocab_size * config.hidden_size if a < 4 else 0


def lowp_saved_bytes(config: ModelConfig, setup: RunSetup) -> int:
    """Low-precision weight copies still referenced once forward (and autocast) has ended."""
    layers = 0 if config.impl.recompute_granularity == "full" else config.num_layers
    unchunked = output_weight_copy_bytes(config, setup) if config.impl.loss_chunk_size <= 0 else 0
    return lowp_weight_bytes(config, setup, layers) + unchunked


# ------------------------------------------------------------------------ transient memory


def loss_grads_in_forward(config: ModelConfig) -> bool:
    """Whether the chunked loss computes its gradients in forward (training passes the mask)."""
    return config.impl.loss_chunk_size > 0 and config.impl.loss_grad_in_forward


def loss_transient_bytes(config: ModelConfig, setup: RunSetup) -> tuple[int, int]:
    """(forward, backward) transient bytes of the output layer + cross entropy.

    Chunked: one chunk's logits (compute dtype, an fp32 copy, a log-sum-exp temporary; with
    ``cross_entropy_fusion`` the logits alone, their gradient written in place), the weight's
    compute-dtype copy, and in backward the fp32 weight gradient and hidden gradient.
    Unchunked: the whole local sequence's logits in fp32 (and their gradient)."""
    g = _dims(config, setup)
    n, a, h = g["n"], g["a"], g["h"]
    vocab = config.padded_vocab_size
    weight_copy = output_weight_copy_bytes(config, setup)
    if config.impl.loss_chunk_size > 0:
        c = min(config.impl.loss_chunk_size, n)
        # Per chunk on CPU: (grad^T @ hidden).float(); CUDA accumulates the low-precision
        # product straight into the fp32 gradient (one GEMM, fp32 output).
        grad_w_tmp = (a + 4) * vocab * h if a < 4 and setup.device != "cuda" else 0
        hid = final_hidden_bytes(config, setup)  # the hidden gradient's dtype
        if loss_grads_in_forward(config):
            # The gradients themselves are among the saved bytes; per chunk the logits (and
            # unfused their fp32 copies) and, on CPU, the hidden gradient's low-precision
            # product (CUDA's GEMM writes fp32 rows in place); in backward the hidden
            # gradient's cast to its dtype (the weight's is scaled in place).
            dh = c * h * a if a < 4 and setup.device != "cuda" else 0
            to_hid = hid * n * h if hid < 4 else 0
            if config.impl.cross_entropy_fusion and setup.device == "cuda":
                return weight_copy + c * vocab * a + dh + 4 * n, to_hid
            fwd = weight_copy + c * vocab * (a + (4 if a < 4 else 0) + 4) + dh + grad_w_tmp
            return fwd, to_hid
        # Fused (CUDA; on CPU the kernels run only in the Triton interpreter, so the model
        # follows the unfused path there): logits only, gradient in place; the saved lse.
        if config.impl.cross_entropy_fusion and setup.device == "cuda":
            fwd = weight_copy + c * vocab * a + c * h * a + 4 * n
            bwd = weight_copy + 4 * vocab * h + hid * n * h + c * vocab * a + grad_w_tmp + 4 * n
            return fwd, bwd
        fwd = weight_copy + c * vocab * (a + (4 if a < 4 else 0) + 4) + c * h * a
        bwd = weight_copy + 4 * vocab * h + hid * n * h + c * vocab * (a + 4) + grad_w_tmp
        return fwd, bwd
    fwd = 4 * n * vocab  # the weight copy is held with the other autocast copies
    # fp32 logit gradients (the saved log-softmax is freed after its backward), then the
    # compute-dtype cast, the hidden and the weight gradients.
    cast = a * n * vocab if a < 4 else 0
    bwd = max(8 * n * vocab, 4 * n * vocab + cast + 4 * n * h + 4 * vocab * h)
    return fwd, bwd


def layer_backward_bytes(config: ModelConfig, setup: RunSetup) -> dict[str, int]:
    """Temporaries of one layer's backward beyond its saved tensors, by kind.

    ``attention_workspace``: the local attention's input gradients dq/dk/dv and its fp32
    accumulators (or the [b, h/p, s, s] gradients of classic attention); ``all_to_all``: send
    and receive buffers of the gradients' all-to-all; ``attention_other`` / ``mlp``: the
    activation gradients around them (the fp32 residual-stream gradient included)."""
    g = _dims(config, setup)
    n, a, h, hd, x, ffn, up, p = (g[k] for k in ("n", "a", "h", "hd", "x", "ffn", "up", "p"))
    hds = g["hds"]
    kvx = x - hd  # K and V width (replicated heads included)
    # Ring: the K/V block in flight and the fp32 dK/dV received, accumulated and being sent.
    ring = n * (2 * a * kvx + 3 * 4 * kvx) if setup.cp > 1 else 0
    if config.impl.attention_backend == "classic" and setup.cp > 1:
        s, b, cp = _seq(config, setup), setup.micro_batch_size, setup.cp
        # one step's fp32 probabilities and their gradient: [b, h/p, 2s/(2cp), s/(2cp)]
        squares = b * (hds // config.kv_channels // p) * (s // cp) * (s // (2 * cp)) * 8
        workspace = squares + n * (a * x + 4 * hds) + ring
    elif config.impl.attention_backend == "classic":
        s, b = _seq(config, setup), setup.micro_batch_size
        # fp32 gradients of the probabilities and of the scores, after the value gradient.
        squares = b * (hds // config.kv_channels // p) * s * s * 8
        workspace = squares + n * a * hds
    else:
        workspace = n * (a * x + 4 * hds) + ring
    shapes = parameter_shapes(config)
    largest_linear = max(_numel(s) for name, s in shapes.items() if _is_linear(name))
    # Autocast over fp32 weights: a weight's low-precision gradient before its cast to fp32.
    # (Weights gathered in the compute dtype take that gradient as their own, no cast.)
    weight_grad_tmp = a * largest_linear if a < 4 and not setup.lowp_layer_params else 0
    # The residual-stream gradient (fp32) and, under autocast, its compute-dtype cast.
    stream = n * (4 * h + (a * h if a < 4 else 0))
    # FC1-output gradient (SwiGLU: the gate and up gradients). The FC2-input gradient
    # replaces FC2's saved input, which is freed by then.
    mlp = stream + n * a * up + weight_grad_tmp
    tile = mlp_tile(config, setup)
    if tile:
        # One tile: the recomputed FC1 output and FC2 input, their gradients; the whole
        # input gradient; the tile's weight gradients beside their fp32 sum. GeLU: FC2's
        # backward frees its input before the FC1-output gradient exists, so three
        # [tile, ffn] tensors at most (measured on an H100 at 256K and 512K tokens).
        c = tile * setup.micro_batch_size
        ffn_tensors = 2 * up + 4 * ffn if config.swiglu else 3 * ffn
        tile_bytes = c * a * (ffn_tensors + h)
        mlp_params = sum(
            _numel(s) for name, s in shapes.items() if name.startswith("transformer.layers.0.mlp.")
        )
        mlp = stream + tile_bytes + final_hidden_bytes(config, setup) * n * h
        mlp += weight_grad_tmp + 4 * mlp_params  # a tile's, beside the fp32 sum
    # --delay-wgrad-compute (SP): the MLP's output gradients and its two linears' inputs
    # wait for dQ/dK/dV's exchange, which computes the weight gradients from them.
    delayed = n * a * (up + h + h + ffn) if config.impl.delay_wgrad_compute and p > 1 else 0
    return {
        "attention_workspace": workspace,
        "all_to_all": 2 * n * a * x if p > 1 else 0,
        "attention_other": stream + n * a * hd + weight_grad_tmp + delayed,  # + context grad
        "mlp": mlp,
    }


# ------------------------------------------------------------------------------- the peak


def _zero_bytes(config: ModelConfig, setup: RunSetup) -> dict[str, int]:
    """Static bytes: stored params, optimizer states, and the sizes FSDP2 works with."""
    shapes = parameter_shapes(config)
    n_gpus, zero = setup.num_gpus, setup.zero_stage
    total = sum(_numel(s) for s in shapes.values())
    layer0 = [s for name, s in shapes.items() if name.startswith("transformer.layers.0.")]
    per_layer = sum(_numel(s) for s in layer0)
    root = total - config.num_layers * per_layer
    if zero == 0:
        local = total
        layer_local = per_layer
    else:
        local = sum(_shard_numel(s, n_gpus) for s in shapes.values())
        layer_local = sum(_shard_numel(s, n_gpus) for s in layer0)
    out_params = config.padded_vocab_size * config.hidden_size + config.hidden_size * (
        2 if config.normalization == "LayerNorm" else 1
    )  # output weight (tied or not) and the final norm: their grads exist from loss backward
    return {
        "total": total,
        "local": local,
        "per_layer": per_layer,
        "layer_local": layer_local,
        "root": root,
        "out_params": out_params,
        "mlp_params": sum(
            _numel(s)
            for name, s in shapes.items()
            if name.startswith("transformer.layers.0.") and (".mlp." in name or "post_att" in name)
        ),
        "params": 4 * local,
        "optimizer": 8 * local + 4 * len(shapes),  # exp_avg, exp_avg_sq, step per tensor
    }


def inputs_on_host(config: ModelConfig, setup: RunSetup) -> bool:
    """--checkpoint-in-cpu on a GPU: recomputed groups' inputs wait in host memory (on a CPU
    run "host" is the device, so nothing moves)."""
    return config.impl.checkpoint_in_cpu and setup.device != "cpu"


def _backward_saved(
    config: ModelConfig,
    act: dict[str, int],
    per_layer_lowp: int,
    group_input: int,
    done: int,
    on_host: bool,
) -> tuple[int, int]:
    """(saved layer activations, low-precision weight copies) while the backward of layer
    ``L - done`` runs, ``done`` layers after the last one finished; ``group_input``: the
    bytes of a checkpointed group's input."""
    left = config.num_layers - done
    if config.impl.recompute_granularity != "full":
        return left * act["per_layer"], left * per_layer_lowp
    k = config.impl.recompute_num_layers
    if config.impl.recompute_method == "uniform":
        in_group = (left - 1) % k + 1  # layers of the recomputed group not yet back-propagated
        # --checkpoint-in-cpu: the group being recomputed and the next one (fetched ahead)
        groups_kept = min(2, math.ceil(left / k)) if on_host else math.ceil(left / k)
        return groups_kept * group_input + in_group * act["per_layer"], in_group * per_layer_lowp
    # block: the first k layers were checkpointed one by one, the rest kept everything
    plain = max(0, left - k)
    recomputed = 1 if left <= k else 0
    inputs_kept = min(2, left) * recomputed if on_host else min(left, k)
    saved = plain * act["per_layer"] + inputs_kept * group_input + recomputed * act["per_layer"]
    return saved, (plain + recomputed) * per_layer_lowp


def estimate_memory(config: ModelConfig, setup: RunSetup) -> MemoryEstimate:
    """Peak per-GPU memory of one training iteration (steady state: optimizer states exist).

    Evaluates the phases where memory can peak (end of forward, loss backward, each layer's
    backward, the optimizer step) and reports the components of the largest."""
    check_heads_for_sp(config.num_attention_heads, config.num_key_value_heads, setup.sp)
    z = _zero_bytes(config, setup)
    act = saved_activation_bytes(config, setup)
    layer_bwd = layer_backward_bytes(config, setup)
    loss_fwd, loss_bwd = loss_transient_bytes(config, setup)
    L, zero, n_gpus = config.num_layers, setup.zero_stage, setup.num_gpus
    saved_total = act["layers"] + act["final"] + act["shared"]
    per_layer_lowp = lowp_weight_bytes(config, setup, 1)
    out_copy = output_weight_copy_bytes(config, setup) if config.impl.loss_chunk_size <= 0 else 0
    n, h = _dims(config, setup)["n"], config.hidden_size

    pb = setup.layer_param_bytes  # a layer's unsharded weights and gradients (root: fp32)

    def unsharded(layers_left: int) -> int:
        if zero == 0:
            return 0
        if zero == 3:
            return 4 * z["root"] + pb * min(2, L) * z["per_layer"]
        return 4 * z["root"] + pb * layers_left * z["per_layer"]

    # ZeRO 1 over several micro-batches (set_micro_batch_sync): in the step's last one, the
    # earlier micro-batches' gradients wait unsharded in fp32 until each layer's reduce-scatter.
    accumulating = zero == 1 and setup.num_micro_batches > 1

    def waiting(layers_left: int) -> int:
        return 4 * (z["root"] + layers_left * z["per_layer"]) if accumulating else 0

    base = {
        "params": 0 if setup.param_offload else z["params"],
        "optimizer": 0 if setup.optimizer_offload or setup.param_offload else z["optimizer"],
    }
    sharded_grad_bytes = 0 if setup.param_offload else 4  # finished layers' shards
    zeros = dict.fromkeys(MemoryEstimate.COMPONENTS, 0)
    phases: list[tuple[str, dict[str, int]]] = []
    phases.append(
        (
            "end of forward (loss)",
            {
                **zeros,
                **base,
                "params_unsharded": unsharded(L),
                "activations": saved_total,
                "params_lowp": per_layer_lowp * L + out_copy,
                "logits": loss_fwd,
                "grads": waiting(L),
            },
        )
    )
    phases.append(
        (
            "loss backward",
            {
                **zeros,
                **base,
                "params_unsharded": unsharded(L),
                "activations": saved_total,
                "params_lowp": lowp_saved_bytes(config, setup),
                "logits": loss_bwd,
                "grads": waiting(L),
            },
        )
    )
    # Layer backward, last layer first: saved tensors and low-precision copies shrink,
    # gradients grow (unsharded for the current FSDP unit, then reduce-scattered). Within a
    # layer the MLP half runs first; its saved tensors are gone when attention's runs.
    mlp_saved = sum(
        v for key, v in layer_saved_bytes(config, setup).items() if key in MLP_SAVED_KEYS
    )
    for done in range(L):
        saved, lowp = _backward_saved(
            config,
            act,
            per_layer_lowp,
            residual_bytes(config, setup) * n * h,
            done,
            inputs_on_host(config, setup),
        )
        # Gradients so far: the output layer's and final norm's (unsharded under ZeRO until
        # the root's backward ends), finished layers' (sharded under ZeRO), the current one's.
        finished = done * (z["per_layer"] if zero == 0 else z["layer_local"])
        grads = 4 * z["out_params"] + sharded_grad_bytes * finished
        if accumulating:  # the root's gradients are among those waiting
            grads = sharded_grad_bytes * finished + waiting(L - done)
        common = {**zeros, **base, "params_unsharded": unsharded(L - done), "params_lowp": lowp}
        layer = L - done
        phases.append(
            (
                f"backward of layer {layer} (MLP)",
                {
                    **common,
                    "grads": grads + pb * z["mlp_params"],
                    "working": layer_bwd["mlp"],
                    "activations": saved + act["shared"],
                },
            )
        )
        phases.append(
            (
                f"backward of layer {layer} (attention)",
                {
                    **common,
                    "grads": grads + pb * z["per_layer"],
                    "activations": saved + act["shared"] - mlp_saved,
                    "attention_workspace": layer_bwd["attention_workspace"],
                    "all_to_all": layer_bwd["all_to_all"],
                    "working": layer_bwd["attention_other"],
                },
            )
        )
        if zero > 0:
            # FSDP2 reshards the layer (stages 1/2: one layer fewer unsharded), then copies its
            # gradients into an fp32 reduce-scatter buffer and frees them; the reduce-scatter
            # writes an fp32 shard, on gloo (CPU) through a full-size copy of the buffer.
            rs = {**common, "activations": saved + act["shared"] - act["per_layer"]}
            if zero < 3:
                rs["params_unsharded"] = unsharded(L - done - 1)
            phases.append(
                (
                    f"gradient reduce-scatter of layer {layer}",
                    {
                        **rs,
                        "grads": grads + (pb + 4) * z["per_layer"],
                    },
                )
            )
            if setup.device == "cpu":
                phases.append(
                    (
                        f"gradient reduce-scatter of layer {layer} (gloo)",
                        {
                            **rs,
                            "grads": grads + 4 * (z["per_layer"] + z["layer_local"]),
                            "working": 4 * z["per_layer"],
                        },
                    )
                )
    # Optimizer step: all gradients; foreach AdamW (CPU) makes fp32 temporaries, fused doesn't.
    fused = setup.device == "cuda"
    on_cpu = setup.optimizer_offload or setup.param_offload  # the step runs on the host
    step_tmp = 0 if fused or on_cpu else 4 * z["local"]
    bucket = min(4 * z["total"], 128 * 2**20) if zero == 0 and n_gpus > 1 else 0
    phases.append(
        (
            "optimizer step",
            {
                **zeros,
                **base,
                "grads": sharded_grad_bytes * z["local"],
                "working": max(step_tmp, bucket),
            },
        )
    )
    name, comps = max(phases, key=lambda item: sum(item[1].values()))
    return MemoryEstimate(
        **comps,
        total=sum(comps.values()),
        peak_phase=name,
        activations_per_layer=act["per_layer"],
        activations_saved=saved_total,
        tokens_per_gpu=n,
        host=host_bytes(config, setup, z),
        details={
            "num_params": z["total"],
            "params_per_gpu": z["local"],
            "layer_saved": layer_saved_bytes(config, setup),
            "layer_backward": layer_bwd,
            "saved": act,
            "phases": {nm: sum(c.values()) for nm, c in phases[:4] + phases[-1:]},
        },
    )


def host_bytes(config: ModelConfig, setup: RunSetup, z: dict | None = None) -> int:
    """Host memory of one GPU's process for what is offloaded: AdamW's states, an fp32
    parameter copy and a gradient buffer (``--cpu-optimizer``) or the sharded parameters,
    gradients and states (``--cpu-offload-params``), 16 bytes per local parameter either
    way; the recomputed groups' inputs under ``--checkpoint-in-cpu``."""
    z = z or _zero_bytes(config, setup)
    out = 0
    if setup.optimizer_offload or setup.param_offload:
        out += 16 * z["local"] + 4 * len(parameter_shapes(config))
    if config.impl.checkpoint_in_cpu and config.impl.recompute_granularity == "full":
        k, L = config.impl.recompute_num_layers, config.num_layers
        groups = k if config.impl.recompute_method == "block" else math.ceil(L / k)
        n, h = _dims(config, setup)["n"], config.hidden_size
        out += groups * residual_bytes(config, setup) * n * h
    return out


def valid_sp_degrees(config: ModelConfig, num_gpus: int) -> list[int]:
    """SP degrees Ulysses accepts for this model on ``num_gpus`` GPUs, ascending."""
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    out = []
    for sp in range(1, num_gpus + 1):
        if num_gpus % sp == 0 and sp <= hq and hq % hkv == 0:
            out.append(sp)
    return out


def find_min_sp(
    config: ModelConfig, setup: RunSetup, budget_bytes: int
) -> tuple[int | None, list[tuple[int, MemoryEstimate]]]:
    """The smallest valid SP degree whose estimate fits ``budget_bytes`` (None if none does),
    and the estimate of every degree tried."""
    tried = []
    for sp in valid_sp_degrees(config, setup.num_gpus):
        est = estimate_memory(config, replace(setup, sp=sp))
        tried.append((sp, est))
        if est.total <= budget_bytes:
            return sp, tried
    return None, tried


def valid_sequence_splits(
    config: ModelConfig, num_gpus: int, max_ulysses: int | None = None
) -> list[tuple[int, int]]:
    """(Ulysses U, ring R) pairs this model accepts on ``num_gpus`` GPUs, U at most
    ``max_ulysses`` (the GPUs of one node: the all-to-alls stay inside it); ordered by the
    sequence's degree U x R, then the larger Ulysses degree first (one all-to-all inside a
    node moves less per rank than a ring's R - 1 K/V hops; README, "Choosing U and R")."""
    out = []
    for sp in valid_sp_degrees(config, num_gpus):
        if max_ulysses is not None and sp > max_ulysses:
            continue
        for cp in range(1, num_gpus // sp + 1):
            s = config.seq_length
            if (num_gpus // sp) % cp or s % (2 * cp if cp > 1 else 1) or s % (sp * cp):
                continue
            out.append((sp, cp))
    return sorted(out, key=lambda uc: (uc[0] * uc[1], -uc[0]))


def find_sequence_split(
    config: ModelConfig, setup: RunSetup, budget_bytes: int, max_ulysses: int | None = None
) -> tuple[tuple[int, int] | None, list[tuple[tuple[int, int], MemoryEstimate]]]:
    """The first (U, R) of :func:`valid_sequence_splits` whose estimate fits
    ``budget_bytes`` (None if none does), and the estimate of every split tried."""
    tried = []
    for sp, cp in valid_sequence_splits(config, setup.num_gpus, max_ulysses):
        est = estimate_memory(config, replace(setup, sp=sp, cp=cp))
        tried.append(((sp, cp), est))
        if est.total <= budget_bytes:
            return (sp, cp), tried
    return None, tried
