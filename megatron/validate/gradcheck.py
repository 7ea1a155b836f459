"""One row of the validation: forward + backward against the fp32 reference, and the kernels
that ran.

The reference is the row's model with the same weights and batch computed by the plainest
path (:data:`megatron.validate.rows.PLAIN`) in fp32 with TF32 off, in one process. A row
runs its configuration (under bf16 autocast on CUDA; fp32 on CPU, where the Triton
interpreter's bf16 dot is not exact) inside the PyTorch profiler; the operator, autograd and
kernel names it records show which kernels actually ran (:data:`TOKENS`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from megatron.data.batch import load_balance_for_context_parallel, slice_batch_for_sequence_parallel
from megatron.model import GPTModel, ModelConfig, masked_lm_loss
from megatron.model.attention_backends import LocalAttention, SDPAAttention
from megatron.model.blockwise_attention import blockwise_step_attention
from megatron.optimizer.host_offload import HostOffloadAdamW
from megatron.validate.rows import BATCH, PLAIN, Row, model_shape

EOD = 0
TINY = 1e-3  # gradients below this share of the model's gradient norm: absolute error

# Kernel tokens: a token is seen when every name of one of its alternatives was recorded
# (exact operator or autograd names; CUDA kernel names by substring, CUDA only).
TOKENS: dict[str, tuple[tuple[str, ...], ...]] = {
    "classic": (("MaskedFillBackward0",),),
    "cudnn": (
        (
            "aten::_scaled_dot_product_cudnn_attention",
            "aten::_scaled_dot_product_cudnn_attention_backward",
        ),
    ),
    "flash": (
        (
            "aten::_scaled_dot_product_flash_attention",
            "aten::_scaled_dot_product_flash_attention_backward",
        ),
    ),
    "efficient": (
        (
            "aten::_scaled_dot_product_efficient_attention",
            "aten::_scaled_dot_product_efficient_attention_backward",
        ),
    ),
    "math": (("aten::_scaled_dot_product_attention_math",),),
    "cpu-flash": (
        (
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
        ),
    ),
    "triton": (
        (
            "FlashAttnTritonFunctionBackward",
            "~flash_fwd_kernel",
            "~bwd_dkdv_kernel",
            "~bwd_dq_kernel",
        ),
    ),
    "triton-fused-dq": (("flash_attn_triton_fused_dq", "~bwd_dkdv_kernel"),),
    "triton-step": (("_BlockwiseStepsBackward", "~flash_fwd_kernel", "~bwd_dkdv_kernel"),),
    "flash_attn": (("FlashAttnFuncBackward",), ("FlashAttnVarlenFuncBackward",)),
    "blockwise": (("_BlockwiseCausalBackward",),),
    "add-norm": (("FusedAddNormBackward", "~_add_norm_fwd_kernel", "~_add_norm_bwd_kernel"),),
    "bias-gelu": (("BiasGeLUBackward", "~_bias_gelu_fwd_kernel", "~_bias_gelu_bwd_kernel"),),
    "ce-fused": (("~_ce_fwd_kernel", "~_ce_bwd_kernel"),),
    "in-place-grads": (("_LookupAddingToGradBackward", "ChunkedMaskedCrossEntropySumBackward"),),
    # --checkpoint-in-cpu's copy out (``.item()`` also copies into pinned memory: not enough)
    "host-offload": (("HostOffload.pack", "~Memcpy DtoH (Device -> Pinned)"),),
    "host-optimizer": (("Optimizer.step#HostOffloadAdamW.step",),),
    "tiled-mlp": (("TiledMLPBackward",),),
    "rope": (("_RotateQKVBackward", "~_rope_kernel"),),
    "all-to-all": (
        ("SeqToHeadAllToAllBackward",),
        ("FusedQKVSeqToHeadBackward",),
        ("RankMajorQKVSeqToHeadBackward",),
    ),
    "rank-major": (("_RankMajorLinearBackward", "RankMajorQKVSeqToHeadBackward"),),
    "delayed-wgrad": (("_LinearDeferredWgradBackward",),),
    "ring": (("_RingAttentionBackward",),),
    # the Triton kernels run as steps inside another autograd function (ring attention)
    "triton-kernels": (("~flash_fwd_kernel", "~bwd_dkdv_kernel"),),
}
ATTENTION = (
    "classic", "cudnn", "flash", "efficient", "math", "cpu-flash", "triton", "triton-step",
    "flash_attn",
)  # fmt: skip


def seen_tokens(names: Counter, kernels: list[str], device_type: str) -> set[str]:
    """Tokens whose names were recorded. ``~name`` matches a CUDA kernel by substring and is
    required only on CUDA (on CPU the Triton interpreter launches no recorded kernel)."""

    def has(name: str) -> bool:
        if name.startswith("~"):
            return device_type != "cuda" or any(name[1:] in k for k in kernels)
        return names[name] > 0

    def observable(alt: tuple[str, ...]) -> bool:
        return device_type == "cuda" or any(not n.startswith("~") for n in alt)

    return {
        tok
        for tok, alts in TOKENS.items()
        if any(observable(alt) and all(map(has, alt)) for alt in alts)
    }


def make_batch(cfg: ModelConfig, seed: int, packed: bool, device: torch.device) -> dict:
    """Random tokens ``[b, s]`` (and labels, positions, loss mask); ``packed``: documents of
    random lengths (an eighth to a third of the sequence) ending in EOD, positions restarting
    after each, EOD positions masked out of the loss (Megatron's --reset-position-ids
    --reset-attention-mask --eod-mask-loss)."""
    g = torch.Generator().manual_seed(seed)
    s, vocab = cfg.seq_length, cfg.padded_vocab_size
    data = torch.randint(1, vocab, (BATCH, s + 1), generator=g)
    doc_ids = None
    position_ids = torch.arange(s).expand(BATCH, s)
    loss_mask = torch.ones(BATCH, s)
    if packed:
        starts = torch.zeros(BATCH, s, dtype=torch.bool)
        for row in range(BATCH):
            pos = 0
            while True:
                pos += int(torch.randint(s // 8, s // 3 + 1, (1,), generator=g))
                if pos >= s:
                    break
                data[row, pos - 1] = EOD  # token pos-1 ends a document; pos starts one
                starts[row, pos] = True
        tokens = data[:, :-1]
        doc_ids = starts.cumsum(dim=1).to(torch.int32)
        idx = torch.arange(s).expand(BATCH, s)
        position_ids = idx - torch.where(starts, idx, 0).cummax(dim=1).values
        loss_mask[tokens == EOD] = 0.0
    batch = {
        "tokens": data[:, :-1],
        "labels": data[:, 1:],
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "doc_ids": doc_ids,
    }
    return {k: None if v is None else v.contiguous().to(device) for k, v in batch.items()}


def config_for(row: Row, device_type: str, reference: bool = False) -> ModelConfig:
    fields = {**model_shape(row.model, device_type), **PLAIN}
    if not reference:
        fields.update(row.overrides)
    return ModelConfig(**fields)


@dataclass
class Grads:
    loss: float
    grads: dict[str, torch.Tensor]


def forward_backward(
    model: GPTModel,
    batches: list[dict],
    autocast: torch.dtype | None,
    sp_group: dist.ProcessGroup | None = None,
) -> Grads:
    """Mean over ``batches`` (micro-batches) of the masked LM loss, backward, gradients
    summed over the SP group (each rank's gradient covers its own tokens)."""
    device_type = batches[0]["tokens"].device.type
    total = 0.0
    for batch in batches:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=bool(autocast)):
            losses = model(
                batch["tokens"],
                batch["position_ids"],
                labels=batch["labels"],
                doc_ids=batch["doc_ids"],
                loss_mask=batch["loss_mask"],
            )
            loss = masked_lm_loss(losses, batch["loss_mask"], sp_group)
        (loss / len(batches)).backward()
        total += loss.item() / len(batches)
    cfg = model.config
    q_width = cfg.num_attention_heads * cfg.head_dim
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        if sp_group is not None:
            dist.all_reduce(g, group=sp_group)
        if ".query_key_value." in name:  # Q, K and V apart: dQ is small next to dV
            for part, g_part in zip("qkv", g.split((q_width, kv_width, kv_width)), strict=True):
                grads[f"{name}[{part}]"] = g_part
        else:
            grads[name] = g
    return Grads(total, grads)


def offloaded_step_check(model: torch.nn.Module) -> list[str]:
    """One AdamW step with the state on the host (:class:`HostOffloadAdamW`) against
    ``torch.optim.AdamW`` on copies with the same gradients, for the parameters as they are
    and as DTensors on the device's mesh (as ZeRO gives them): failures
    (the updated weights differ by more than 1e-6 relative, a state is not in host memory, or
    not pinned on CUDA), none when all is well."""
    params = [p for p in model.parameters() if p.grad is not None]
    hyper = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    own_group = not dist.is_initialized()
    if own_group:  # one process: a group of one, for the mesh
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh(params[0].device.type, list(range(dist.get_world_size())))

        def as_dtensor(t: torch.Tensor) -> torch.Tensor:
            return DTensor.from_local(t.detach().clone(), mesh, [Replicate()], run_check=False)

        sharded = [torch.nn.Parameter(as_dtensor(p)) for p in params]
        for d, p in zip(sharded, params):
            d.grad = as_dtensor(p.grad)
        failures = _offloaded_step(sharded, params, hyper, "DTensor ")
    finally:
        if own_group:
            dist.destroy_process_group()
    return failures + _offloaded_step(params, params, hyper, "")


def _offloaded_step(params: list, plain: list, hyper: dict, kind: str) -> list[str]:
    """:class:`HostOffloadAdamW` steps ``params``; AdamW steps copies of ``plain`` (the same
    values and gradients, as plain tensors)."""
    copies = [p.detach().clone().requires_grad_() for p in plain]
    for c, p in zip(copies, plain):
        c.grad = p.grad.detach().clone()
    torch.optim.AdamW(copies, **hyper).step()
    optimizer = HostOffloadAdamW(params, **hyper)
    optimizer.step()
    failures = [kind + f for f in offloaded_state_check(optimizer)]
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    worst = max(((p - c).norm() / c.norm().clamp_min(1e-30)).item() for p, c in zip(local, copies))
    if not worst <= 1e-6:
        failures.append(f"host-offloaded AdamW step on {kind}parameters differs by {worst:.3g}")
    return failures


def offloaded_state_check(optimizer: HostOffloadAdamW) -> list[str]:
    """Failures when a moment of ``optimizer`` is not in (pinned, on CUDA) host memory."""
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key].to_local() if isinstance(state[key], DTensor) else state[key]
            if t.device.type != "cpu" or (torch.cuda.is_available() and not t.is_pinned()):
                return [f"optimizer state {key} is on {t.device} (pinned: {t.is_pinned()})"]
    return []


@dataclass
class Result:
    row: Row
    status: str  # PASS | FAIL | SKIP
    seconds: float
    seen: set[str]
    worst_param: str = ""
    worst_err: float = 0.0
    worst_tol: float = 0.0
    min_cos: float = 1.0
    loss_err: float = 0.0
    reason: str = ""
    errors: dict[str, float] = dataclasses.field(default_factory=dict)


def compare(
    got: Grads, ref: Grads, baseline: dict[str, float], floor: float, min_cos: float
) -> tuple[list[str], dict[str, float], tuple[str, float, float], float]:
    """(failures, per-parameter errors, (worst name, its error, its tolerance), min cosine).

    A parameter passes when ``|g - g_ref| / |g_ref| <= max(3 x baseline, floor)`` and the
    cosine similarity is at least ``min_cos``. A gradient below ``TINY`` of the whole
    model's gradient norm (the K bias's is zero in exact arithmetic: softmax ignores a shift
    shared by all keys) is measured against that floor instead, and has no cosine."""
    failures: list[str] = []
    errors: dict[str, float] = {}
    worst = ("", 0.0, floor)
    lowest_cos = 1.0
    total = sum(g.norm().item() ** 2 for g in ref.grads.values()) ** 0.5
    for name, g_ref in ref.grads.items():
        g = got.grads[name]
        ref_norm, got_norm = g_ref.norm().item(), g.norm().item()
        err = (g - g_ref).norm().item() / max(ref_norm, TINY * total)
        cos = 1.0
        if ref_norm >= TINY * total:
            cos = (torch.dot(g.flatten(), g_ref.flatten()) / max(got_norm * ref_norm, 1e-30)).item()
        tol = max(3.0 * baseline.get(name, 0.0), floor)
        errors[name] = err
        lowest_cos = min(lowest_cos, cos)
        if err / tol > worst[1] / worst[2] or err != err:
            worst = (name, err, tol)
        if not (err <= tol and cos >= min_cos):  # NaN fails
            failures.append(f"{name}: error {err:.3g} (tolerance {tol:.3g}), cosine {cos:.6f}")
    return failures, errors, worst, lowest_cos


class Checker:
    """Runs rows on one device, caching the fp32 reference per (model, batch kind)."""

    def __init__(
        self,
        device: torch.device,
        baseline: dict[str, dict[str, float]],
        floor: float,
        min_cos: float,
        model_hook: Callable[[GPTModel], None] | None = None,
    ) -> None:
        self.device = device
        self.baseline = baseline
        self.floor, self.min_cos = floor, min_cos
        self.model_hook = model_hook
        self._refs: dict[tuple, tuple[dict, list[dict], Grads]] = {}

    def _reference(self, row: Row) -> tuple[dict, list[dict], Grads]:
        key = (row.model, row.packed, row.micro_batches)
        if key not in self._refs:
            cfg = config_for(row, self.device.type, reference=True)
            torch.manual_seed(1234)
            model = GPTModel(cfg, device=self.device)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            batches = [
                make_batch(cfg, 100 + i, row.packed, self.device) for i in range(row.micro_batches)
            ]
            with _no_tf32():
                ref = forward_backward(model, batches, None)
            self._refs[key] = (state, batches, ref)
        return self._refs[key]

    def run(self, row: Row, sp_group: dist.ProcessGroup | None = None) -> Result:
        start = time.perf_counter()
        state, batches, ref = self._reference(row)
        cfg = config_for(row, self.device.type)
        seq_group = sp_group  # the ranks sharing one sequence: loss and gradients over them
        cp_group = sp_group if row.ring else None
        if row.ring:
            sp_group = None
        model = GPTModel(cfg, sp_group=sp_group, device=self.device, cp_group=cp_group)
        model.load_state_dict(state)
        if not row.flash_attn:  # torch SDPA even where the flash_attn package is installed
            for module in model.modules():
                if isinstance(module, SDPAAttention):
                    module._flash = None
        if row.step_blocks:
            _attention_by_steps(model, cfg.seq_length // row.sp // row.step_blocks)
        if self.model_hook is not None:
            self.model_hook(model)
        seq_rank = 0 if seq_group is None else dist.get_rank(seq_group)
        if row.ring:  # Megatron-LM's load balancing: ring rank i holds chunks i and 2R-1-i
            batches = [load_balance_for_context_parallel(b, row.sp) for b in batches]
        local = [slice_batch_for_sequence_parallel(b, seq_rank, row.sp) for b in batches]
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof, _fused_dq(row.fused_dq):
            got = forward_backward(model, local, autocast, seq_group)
            step_failures = offloaded_step_check(model) if row.optimizer_offload else []
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        events = prof.events()
        names = Counter(e.name for e in events)
        kernels = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        seen = seen_tokens(names, kernels, self.device.type)
        failures, errors, worst, min_cos = compare(
            got, ref, self.baseline.get(row.model, {}), self.floor, self.min_cos
        )
        loss_err = abs(got.loss - ref.loss) / abs(ref.loss)
        if not loss_err <= self.floor:
            failures.insert(0, f"loss {got.loss:.6f} against {ref.loss:.6f}")
        failures = step_failures + failures
        missing = [t for t in row.expect if t not in seen]
        others = sorted((seen & set(ATTENTION)) - set(row.expect))
        if missing:
            failures.insert(0, f"expected kernel(s) not seen: {', '.join(missing)}")
        if others:
            failures.insert(0, f"other attention kernel(s) ran: {', '.join(others)}")
        return Result(
            row,
            "FAIL" if failures else "PASS",
            time.perf_counter() - start,
            seen,
            worst[0],
            worst[1],
            worst[2],
            min_cos,
            loss_err,
            "; ".join(failures),
            errors,
        )


def _attention_by_steps(model: GPTModel, block: int) -> None:
    """Every local attention computed by its backend's step over ``block``-token blocks
    (megatron.model.blockwise_attention.blockwise_step_attention), as ring attention would."""
    for module in model.modules():
        if isinstance(module, LocalAttention):

            def forward(q, k, v, *, doc_ids=None, m=module):
                return blockwise_step_attention(q, k, v, m.step, block, m.softmax_scale, doc_ids)

            module.forward = forward


class _fused_dq:
    """The Triton backward with dQ in the dK/dV kernel (flash_attn_triton.FUSED_DQ) inside."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        if self.on:
            import megatron.ops.flash_attn_triton as fa  # imports triton

            self.fa, self.saved, fa.FUSED_DQ = fa, fa.FUSED_DQ, True

    def __exit__(self, *exc) -> None:
        if self.on:
            self.fa.FUSED_DQ = self.saved


class _no_tf32:
    """TF32 off for matmuls and cuDNN inside the block (the fp32 reference)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
