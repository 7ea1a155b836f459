"""Local (single-rank) causal attention backends behind one interface.

Every backend is a module called as ``attn(q, k, v, *, doc_ids=None)`` with q ``[s, b, hq, d]``
and k/v ``[s, b, hkv, d]`` (``hkv`` divides ``hq``: GQA/MQA without repeating K/V in memory
where the kernel allows), possibly non-contiguous views (what DistributedAttention hands
over), and returns the context ``[s, b, hq, d]``. ``doc_ids`` ``[b, s]`` are per-token
document ids of packed sequences: a query attends only to earlier keys of its own document.

* ``classic``: fp32 matmul + softmax with an explicit mask; dropout on the probabilities.
* ``sdpa``: ``flash_attn`` v2 when importable (CUDA, fp16/bf16), else the kernel that
  ``megatron.ops.attention_choice`` measured fastest for the mask on this GPU: PyTorch's
  ``scaled_dot_product_attention`` for causal attention (no backend forced: PyTorch picks
  cuDNN/flash/...; a causal sequence of at least two ``sdpa_block_size`` blocks runs
  blockwise, ``megatron.model.blockwise_attention``), this project's Triton kernel for packed
  documents on CUDA (O(s) memory; per-document SDPA where it cannot run). On CPU packed
  documents use SDPA with the dense ``[b, 1, s, s]`` mask, the reference at test sizes.
* ``triton``: this project's Triton FlashAttention (imported lazily; no dropout).

Every backend also exposes ``attn.step``, its local attention step (one query block against
one key block, returning the log-sum-exp, with a backward from the merged result;
``megatron.model.attention_step``), on which blockwise and ring attention are built.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from megatron.model.attention_step import CLASSIC_STEP, SDPA_STEP, TRITON_STEP, AttentionStep
from megatron.model.blockwise_attention import (
    blockwise_causal_attention,
    blockwise_causal_usable,
)
from megatron.ops import attention_choice, contiguous_grad
from megatron.ops.packed_attention import (
    cu_seqlens,
    document_loop_attention,
    varlen_attention,
)

logger = logging.getLogger(__name__)


def causal_doc_mask(s: int, doc_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean "may attend" mask: [s, s] (causal) or [b, 1, s, s] (causal and same document)."""
    allowed = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return allowed
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [b, s, s]
    return (same_doc & allowed)[:, None]


class LocalAttention(torch.nn.Module):
    """Common state: dropout probability and softmax scale, fixed at construction."""

    step: AttentionStep = CLASSIC_STEP  # the backend's block step (no dropout)

    def __init__(self, attention_dropout: float, softmax_scale: float) -> None:
        super().__init__()
        self.dropout_p = attention_dropout
        self.softmax_scale = softmax_scale

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def extra_repr(self) -> str:
        return f"dropout={self.dropout_p}, softmax_scale={self.softmax_scale:.4g}"


class ClassicAttention(LocalAttention):
    """Megatron's unfused path: scores and softmax in fp32, explicit mask, dropout on probs."""

    def forward(self, q, k, v, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        s, b, hq, d = q.shape
        hkv = k.shape[2]
        group = hq // hkv
        # [s, b, hq, d] -> [b, hkv, group, s, d]; K/V broadcast over the group (no copies).
        q5 = q.permute(1, 2, 0, 3).reshape(b, hkv, group, s, d)
        k5 = k.permute(1, 2, 0, 3)[:, :, None]  # [b, hkv, 1, s, d]
        v5 = v.permute(1, 2, 0, 3)[:, :, None]  # [b, hkv, 1, s, d]
        allowed = causal_doc_mask(s, doc_ids, q.device)
        if allowed.dim() == 4:  # [b, 1, s, s] -> [b, 1, 1, s, s]
            allowed = allowed[:, :, None]
        # Scores and softmax in fp32, also under autocast (which would run the matmul in bf16).
        with torch.autocast(q.device.type, enabled=False):
            scores = torch.matmul(q5.float(), k5.float().transpose(-1, -2))  # [b, hkv, g, s, s]
            scores = (scores * self.softmax_scale).masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            probs = F.dropout(probs, p=self._dropout(), training=self.training)
        context = torch.matmul(probs.to(v.dtype), v5)  # [b, hkv, g, s, d]
        return context.reshape(b, hq, s, d).permute(2, 0, 1, 3)  # [s, b, hq, d]


@functools.cache
def _load_flash_attn():
    """``(flash_attn_func, flash_attn_varlen_func)`` of flash_attn v2, or None (logged once)."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        logger.info(
            "> attention: flash_attn is not installed; --use-flash-attn picks its kernels "
            "from megatron/ops/attention_choice.py"
        )
        return None
    if not str(getattr(flash_attn, "__version__", "0")).startswith("2."):
        logger.warning(
            "flash_attn %s is not v2; --use-flash-attn uses torch SDPA instead",
            flash_attn.__version__,
        )
        return None
    logger.info("> attention: flash_attn %s for CUDA fp16/bf16 inputs", flash_attn.__version__)
    return flash_attn_func, flash_attn_varlen_func


# Devices on which packed documents take an O(s) kernel (megatron.ops.attention_choice);
# elsewhere (CPU) the dense [b, 1, s, s] mask and SDPA, the reference at test sizes.
PACKED_ROUTED_DEVICES = ("cuda",)


class SDPAAttention(LocalAttention):
    """``--use-flash-attn``: flash_attn v2 if importable, else the kernel chosen per mask by
    megatron.ops.attention_choice (module docstring)."""

    step = SDPA_STEP

    def __init__(
        self, attention_dropout: float, softmax_scale: float, sdpa_block_size: int = 0
    ) -> None:
        super().__init__(attention_dropout, softmax_scale)
        self._flash = _load_flash_attn()
        self.block_size = sdpa_block_size

    def _blockwise(self, q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, doc_ids) -> bool:
        """Blockwise: no document mask or dropout, equal heads; on CUDA what cuDNN takes."""
        if doc_ids is not None or self._dropout() > 0 or not self.block_size:
            return False
        if q_bhsd.is_cuda and not (
            q_bhsd.dtype in (torch.float16, torch.bfloat16)
            and q_bhsd.shape[-1] <= 128
            and torch.backends.cuda.cudnn_sdp_enabled()
        ):
            return False
        return blockwise_causal_usable(q_bhsd, k_bhsd, self.block_size)

    def _flash_usable(self, q: torch.Tensor) -> bool:
        return self._flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)

    def forward(self, q, k, v, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self._flash_usable(q):
            return self._flash_attn(q, k, v, doc_ids)
        if doc_ids is not None and q.device.type in PACKED_ROUTED_DEVICES:
            return self._packed(q, k, v, doc_ids)
        if doc_ids is None and q.is_cuda and self._choose(q, "causal").kernel == "triton":
            from megatron.ops.flash_attn_triton import flash_attn_triton  # imports triton

            return flash_attn_triton(q, k, v, causal=True, softmax_scale=self.softmax_scale)
        hq, hkv = q.shape[2], k.shape[2]
        q_bhsd, k_bhsd, v_bhsd = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if self._blockwise(q_bhsd, k_bhsd, doc_ids):
            out_bhsd = blockwise_causal_attention(
                q_bhsd, k_bhsd, v_bhsd, self.block_size, self.softmax_scale
            )
            return out_bhsd.permute(2, 0, 1, 3)  # [s, b, hq, d]
        mask = None if doc_ids is None else causal_doc_mask(q.shape[0], doc_ids, q.device)
        out_bhsd = F.scaled_dot_product_attention(
            q_bhsd,
            k_bhsd,
            v_bhsd,
            attn_mask=mask,
            dropout_p=self._dropout(),
            is_causal=mask is None,
            scale=self.softmax_scale,
            enable_gqa=hq != hkv,
        )
        if out_bhsd.is_cuda and out_bhsd.requires_grad:
            out_bhsd = contiguous_grad(out_bhsd)
        return out_bhsd.permute(2, 0, 1, 3)  # [s, b, hq, d]

    def _packed(self, q, k, v, doc_ids: torch.Tensor) -> torch.Tensor:
        """Packed documents in O(s) memory by the kernel of megatron.ops.attention_choice."""
        choice = self._choose(q, "documents")
        if choice.kernel == "triton":
            from megatron.ops.flash_attn_triton import flash_attn_triton  # imports triton

            return flash_attn_triton(
                q, k, v, causal=True, softmax_scale=self.softmax_scale, doc_ids=doc_ids
            )
        if choice.kernel == "varlen":
            return varlen_attention(q, k, v, doc_ids, softmax_scale=self.softmax_scale)
        return document_loop_attention(
            q, k, v, doc_ids, softmax_scale=self.softmax_scale, dropout_p=self._dropout()
        )

    def _choose(self, q: torch.Tensor, mask: str) -> attention_choice.Choice:
        """The table's kernel for this call (megatron.ops.attention_choice), logged once."""
        choice = attention_choice.choose(
            q.device, mask=mask, seq=q.shape[0], head_dim=q.shape[3], dtype=q.dtype,
            dropout=self._dropout() > 0,
        )  # fmt: skip
        attention_choice.log_choice(
            attention_choice.gpu_type(q.device), mask, choice.kernel, choice.why
        )
        return choice

    def _flash_attn(self, q, k, v, doc_ids) -> torch.Tensor:
        flash_attn_func, flash_attn_varlen_func = self._flash
        s, b, hq, d = q.shape
        kw = {"dropout_p": self._dropout(), "softmax_scale": self.softmax_scale, "causal": True}
        if doc_ids is None:
            q_bshd, k_bshd, v_bshd = (t.transpose(0, 1) for t in (q, k, v))
            return flash_attn_func(q_bshd, k_bshd, v_bshd, **kw).transpose(0, 1)
        cu, max_len = cu_seqlens(doc_ids)
        q_t, k_t, v_t = (t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (q, k, v))
        out = flash_attn_varlen_func(q_t, k_t, v_t, cu, cu, max_len, max_len, **kw)
        return out.view(b, s, hq, d).transpose(0, 1)  # [s, b, hq, d]


class TritonAttention(LocalAttention):
    """``--use-flash-attn-triton``: megatron.ops.flash_attn_triton (attention dropout unsupported)."""

    step = TRITON_STEP

    def __init__(self, attention_dropout: float, softmax_scale: float) -> None:
        super().__init__(attention_dropout, softmax_scale)
        self._warned = False

    def forward(self, q, k, v, *, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        from megatron.ops.flash_attn_triton import flash_attn_triton  # imports triton: lazily

        if self.training and self.dropout_p > 0 and not self._warned:
            self._warned = True
            logger.warning(
                "--attention-dropout %s is not applied by the Triton attention backend "
                "(--use-flash-attn-triton); use --attention-dropout 0 to silence this",
                self.dropout_p,
            )
        return flash_attn_triton(
            q, k, v, causal=True, softmax_scale=self.softmax_scale, doc_ids=doc_ids, layout="sbhd"
        )


_BACKENDS = {"classic": ClassicAttention, "sdpa": SDPAAttention, "triton": TritonAttention}


def build_local_attention(
    backend: str, *, attention_dropout: float, softmax_scale: float, sdpa_block_size: int = 0
) -> LocalAttention:
    """The local attention module named ``backend`` (classic | sdpa | triton)."""
    if backend == "sdpa":
        return SDPAAttention(attention_dropout, softmax_scale, sdpa_block_size)
    return _BACKENDS[backend](attention_dropout, softmax_scale)
