"""Causal attention over packed documents in O(s) memory, by PyTorch's kernels.

The alternatives to this project's Triton kernel (megatron.ops.attention_choice says which
runs): ``document_loop_attention`` calls SDPA on every document's ``[start, end)`` slice
(any head dim, dropout), ``varlen_attention`` calls ``torch.nn.attention.varlen.varlen_attn``
once over cumulative document lengths. Neither builds a ``[s, s]`` mask. Inputs are
``[s, b, h, d]`` (k/v with ``hkv`` dividing ``h``), doc ids ``[b, s]`` non-decreasing along
s; the output is ``[s, b, hq, d]``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def document_bounds(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per batch row, the ``[start, end)`` of each document (one host sync)."""
    b, s = doc_ids.shape
    change = torch.ones(b, s + 1, dtype=torch.bool, device=doc_ids.device)
    change[:, 1:s] = doc_ids[:, 1:] != doc_ids[:, :-1]
    rows, cols = change.nonzero(as_tuple=True)
    cuts: list[list[int]] = [[] for _ in range(b)]
    for r, c in zip(rows.tolist(), cols.tolist()):
        cuts[r].append(c)
    return [list(zip(c[:-1], c[1:])) for c in cuts]


def document_loop_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    softmax_scale: float,
    dropout_p: float = 0.0,
    causal: bool = True,
) -> torch.Tensor:
    """SDPA per document, causal by default (PyTorch picks cuDNN/flash for each slice)."""
    hq, hkv = q.shape[2], k.shape[2]
    rows = []
    for row, bounds in enumerate(document_bounds(doc_ids)):
        outs = []
        for start, end in bounds:
            # [1, h, L, d] views of this document's tokens
            qd, kd, vd = (t[start:end, row : row + 1].permute(1, 2, 0, 3) for t in (q, k, v))
            o = F.scaled_dot_product_attention(
                qd, kd, vd, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale,
                enable_gqa=hq != hkv,
            )  # fmt: skip
            outs.append(o.permute(2, 0, 1, 3))  # [L, 1, hq, d]
        rows.append(torch.cat(outs, dim=0))
    return torch.cat(rows, dim=1)


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened ``[b * s]`` tokens (int32), and the
    longest document (one host sync). A document starts at each row start and id change."""
    b, s = doc_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = starts.flatten().nonzero().flatten()
    end = torch.tensor([b * s], device=doc_ids.device, dtype=start_idx.dtype)
    cu = torch.cat((start_idx, end)).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, *, softmax_scale
) -> torch.Tensor:
    """Causal ``varlen_attn`` over the documents (CUDA, fp16/bf16; torch >= 2.10)."""
    from torch.nn.attention.varlen import varlen_attn

    s, b, hq, d = q.shape
    cu, max_len = cu_seqlens(doc_ids)
    params = inspect.signature(varlen_attn).parameters
    gqa = {}
    if k.shape[2] != hq and "enable_gqa" in params:
        gqa = {"enable_gqa": True}
    elif k.shape[2] != hq:  # releases without enable_gqa: repeat the K/V heads
        k, v = (t.repeat_interleave(hq // t.shape[2], dim=2) for t in (k, v))
    # torch 2.10/2.11 take is_causal; later releases a (left, right) window, (-1, 0) = causal.
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    q_t, k_t, v_t = (t.transpose(0, 1).reshape(b * s, t.shape[2], d) for t in (q, k, v))
    out = varlen_attn(q_t, k_t, v_t, cu, cu, max_len, max_len, scale=softmax_scale, **causal, **gqa)
    return out.view(b, s, hq, d).transpose(0, 1)
