"""A float64 forward of a GPT in Megatron's own layout (legacy names, per-group QKV rows).

Written from Megatron-LM's legacy ParallelAttention: the fused projection's output is viewed
as ``[s, b, nkv, nq/nkv + 2, d]`` and split into the group's query heads, one key and one
value head; K/V heads serve their group's query heads; RoPE rotates halves.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _norm(x, w, b, kind: str, eps: float = 1e-5):
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def _rope(t, theta: float = 10000.0):  # [b, s, heads, d]
    d, s = t.shape[-1], t.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], -1)[None, :, None, :]
    x1, x2 = t.chunk(2, -1)
    return t * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def megatron_logits(w: dict[str, torch.Tensor], c: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] in float64 from Megatron-legacy-named weights ``w``."""
    w = {k: v.double() for k, v in w.items()}
    b, s = tokens.shape
    nq, nkv, d = c["num_attention_heads"], c["num_kv"], c["kv_channels"]
    group = nq // nkv
    x = w["language_model.embedding.word_embeddings.weight"][tokens]
    if "language_model.embedding.position_embeddings.weight" in w:
        x = x + w["language_model.embedding.position_embeddings.weight"][:s]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    for i in range(c["num_layers"]):
        p = f"language_model.encoder.layers.{i}."

        def lin(name, inp, p=p):
            out = inp @ w[p + name + ".weight"].t()
            return out + w[p + name + ".bias"] if p + name + ".bias" in w else out

        h = _norm(x, w[p + "input_norm.weight"], w.get(p + "input_norm.bias"), c["normalization"])
        mixed = lin("self_attention.query_key_value", h).view(b, s, nkv, group + 2, d)
        q = mixed[:, :, :, :group].reshape(b, s, nq, d)
        k, v = mixed[:, :, :, group], mixed[:, :, :, group + 1]
        if c["position_embedding_type"] == "rope":
            q, k = _rope(q), _rope(k)
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, nq * d)
        x = x + lin("self_attention.dense", ctx)
        h = _norm(
            x,
            w[p + "post_attention_norm.weight"],
            w.get(p + "post_attention_norm.bias"),
            c["normalization"],
        )
        h = lin("mlp.dense_h_to_4h", h)
        if c["swiglu"]:
            gate, up = h.chunk(2, -1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        x = x + lin("mlp.dense_4h_to_h", h)
    x = _norm(
        x,
        w["language_model.encoder.final_norm.weight"],
        w.get("language_model.encoder.final_norm.bias"),
        c["normalization"],
    )
    head = w.get(
        "language_model.output_layer.weight", w["language_model.embedding.word_embeddings.weight"]
    )
    return x @ head.t()
