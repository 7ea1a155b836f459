"""In-process unit tests of the GPT model: shapes, RoPE, GQA, backends, loss, init, config."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from model_utils import (
    LLAMA,
    PADDED_VOCAB,
    SEQ,
    assert_grads_close,
    build_model,
    forward_loss,
    grads_of,
    make_batch,
    tiny_config,
)

from megatron.errors import UsageError
from megatron.model import GPTModel, ModelConfig, masked_lm_loss, model_flops_per_token, rotary
from megatron.model import attention_backends as backends
from megatron.model.flops import parameter_counts
from megatron.model.rotary import apply_rotary, rotary_cos_sin, rotate_qkv

# ---------------------------------------------------------------- shapes and structure


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_shapes(style):
    model = build_model(**(LLAMA if style == "llama" else {}))
    batch = make_batch(3, seed=1)
    logits = model(batch["tokens"], batch["position_ids"])
    assert logits.shape == (3, SEQ, PADDED_VOCAB)
    losses = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    assert losses.shape == (3, SEQ) and losses.dtype == torch.float32
    # The per-token losses are the cross entropy of the logits.
    expected = F.cross_entropy(
        logits.reshape(-1, PADDED_VOCAB), batch["labels"].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(losses.reshape(-1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        LLAMA,
        {**LLAMA, "num_key_value_heads": 1, "untie_embeddings_and_output_weights": True},
        {"kv_channels": 16, "ffn_hidden_size": 96, "position_embedding_type": "none"},
    ],
    ids=["gpt", "llama", "mqa-untied", "kv16-nopos"],
)
def test_parameter_counts(overrides):
    config = tiny_config(**overrides)
    model = GPTModel(config)
    counts = parameter_counts(config)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    n_emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embedding."))
    assert n_emb == counts["embedding"]
    tied = not config.untie_embeddings_and_output_weights
    assert (model.output_weight() is model.embedding.word_embeddings.weight) == tied


def test_gqa_projection_widths():
    model = build_model(**{**LLAMA, "num_key_value_heads": 2})
    attn = model.transformer.layers[0].self_attention
    # 8 query heads + 2 key heads + 2 value heads, head size 8, no bias.
    assert attn.query_key_value.weight.shape == ((8 + 2 + 2) * 8, 64)
    assert attn.query_key_value.bias is None
    mlp = model.transformer.layers[0].mlp
    assert mlp.dense_h_to_4h.weight.shape == (2 * 192, 64)  # SwiGLU: fused gate|up, 8h/3 -> 192
    assert isinstance(model.transformer.final_layernorm, torch.nn.RMSNorm)


def test_init_std():
    config = tiny_config(num_layers=8, hidden_size=256, num_attention_heads=8, init_method_std=0.02)
    torch.manual_seed(0)
    model = GPTModel(config)
    layer = model.transformer.layers[3]
    scaled = 0.02 / math.sqrt(2 * 8)
    for weight, std in (
        (layer.self_attention.query_key_value.weight, 0.02),
        (layer.mlp.dense_h_to_4h.weight, 0.02),
        (model.embedding.word_embeddings.weight, 0.02),
        (layer.self_attention.dense.weight, scaled),
        (layer.mlp.dense_4h_to_h.weight, scaled),
    ):
        assert abs(weight.std().item() / std - 1) < 0.05
        assert abs(weight.mean().item()) < 0.1 * std
    assert torch.all(layer.self_attention.dense.bias == 0)
    assert torch.all(layer.input_layernorm.weight == 1) and torch.all(
        layer.input_layernorm.bias == 0
    )


def test_same_seed_same_weights_and_dtype():
    a, b = build_model(seed=5, **LLAMA), build_model(seed=5, **LLAMA)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    half = GPTModel(tiny_config(params_dtype=torch.bfloat16))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------- RoPE


def _rope_reference(x_sbhd, positions_bs, rot_dim, theta):
    """Pair (i, i + rot/2) of each head rotated by angle position * theta^(-2i/rot)."""
    out = x_sbhd.clone()
    s, b, h, _ = x_sbhd.shape
    half = rot_dim // 2
    for si in range(s):
        for bi in range(b):
            pos = float(positions_bs[bi, si])
            for i in range(half):
                angle = pos * theta ** (-2.0 * i / rot_dim)
                c, sn = math.cos(angle), math.sin(angle)
                x1, x2 = x_sbhd[si, bi, :, i], x_sbhd[si, bi, :, i + half]
                out[si, bi, :, i] = x1 * c - x2 * sn
                out[si, bi, :, i + half] = x2 * c + x1 * sn
    return out


@pytest.mark.parametrize("rot_dim", [8, 4])
def test_rope_matches_reference(rot_dim):
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, 8, dtype=torch.float64).float()
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    cos, sin = rotary_cos_sin(positions, rot_dim, 10000.0)
    assert cos.shape == (5, 2, 1, rot_dim)
    got = apply_rotary(x, cos, sin)
    torch.testing.assert_close(
        got, _rope_reference(x, positions, rot_dim, 10000.0), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(got[..., rot_dim:], x[..., rot_dim:])  # the pass-through channels


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [8, 4])
def test_rotate_qkv_matches_apply_rotary(dtype, rot_dim):
    """q and k rotated inside the QKV buffer: the values of apply_rotary (bitwise), its
    gradients, and v passed through; GQA (4 q, 2 kv heads)."""
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 8
    qkv = torch.randn(5, 2, hq + 2 * hkv, d, dtype=torch.float64).to(dtype).requires_grad_()
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    cos, sin = rotary_cos_sin(positions, rot_dim, 10000.0)
    q, k, v = rotate_qkv(qkv, cos, sin, hq, hkv)
    ref_in = qkv.detach().clone().requires_grad_()
    q_ref, k_ref, v_ref = ref_in.split((hq, hkv, hkv), dim=2)
    q_ref, k_ref = apply_rotary(q_ref, cos, sin), apply_rotary(k_ref, cos, sin)
    for got, ref in ((q, q_ref), (k, k_ref), (v, v_ref)):
        assert torch.equal(got, ref)
    grads = [torch.randn_like(t) for t in (q, k, v)]
    torch.autograd.backward((q, k, v), grads)
    torch.autograd.backward((q_ref, k_ref, v_ref), grads)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(qkv.grad, ref_in.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,rot_dim", [(8, 8), (12, 8)])
def test_triton_rope_equals_the_torch_rotation(dtype, d, rot_dim):
    """The one-pass Triton rotation (rotate_qkv on CUDA; the interpreter here) against the
    PyTorch path: forward and transpose (sign -1), 7 heads of which 5 rotate, a head size that
    is not a power of two, cos/sin broadcast over the batch."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from megatron.ops.rope_triton import rotate_heads

    torch.manual_seed(0)
    x = torch.randn(6, 2, 7, d).to(dtype)
    cos, sin = rotary_cos_sin(torch.tensor([[3, 4, 5, 6, 7, 8]]), rot_dim, 10000.0)  # b = 1
    for sign in (1.0, -1.0):
        want = rotary._rotate_heads(
            x, cos.expand(6, 2, 1, rot_dim), sin.expand(6, 2, 1, rot_dim), 5, sign
        )
        got = rotate_heads(x, cos, sin, 5, sign)
        assert got.dtype == dtype and torch.equal(got[:, :, 5:], x[:, :, 5:])
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 if dtype == torch.float16 else 1e-6)


def test_rope_scores_depend_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rotary_cos_sin(torch.tensor([[pq]]), 16, 500.0)
        ck, sk = rotary_cos_sin(torch.tensor([[pk]]), 16, 500.0)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


# ---------------------------------------------------------------- attention backends


def _reference_attention(q, k, v, doc_ids=None):
    """Per-head loops over explicit causal (+ document) masks; [s, b, h, d]."""
    s, b, hq, d = q.shape
    group = hq // k.shape[2]
    out = torch.empty_like(q)
    for bi in range(b):
        for hi in range(hq):
            scores = q[:, bi, hi] @ k[:, bi, hi // group].t() / math.sqrt(d)
            allowed = torch.ones(s, s, dtype=torch.bool).tril()
            if doc_ids is not None:
                allowed &= doc_ids[bi][:, None] == doc_ids[bi][None, :]
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[:, bi, hi] = probs @ v[:, bi, hi // group]
    return out


def _qkv(s=16, b=2, hq=4, hkv=2, d=8, seed=0, fused=None):
    torch.manual_seed(seed)
    # Non-contiguous views, like the split of a fused projection / the all-to-all output.
    if fused is None:
        fused = torch.randn(s, b, (hq + 2 * hkv) * d)
    q, k, v = fused.split((hq * d, hkv * d, hkv * d), dim=-1)
    return q.view(s, b, hq, d), k.view(s, b, hkv, d), v.view(s, b, hkv, d)


DOCS = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["classic", "sdpa", "triton"])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("docs", [False, True])
def test_backend_matches_reference(backend, hkv, docs):
    q, k, v = _qkv(hkv=hkv)
    doc_ids = DOCS if docs else None
    attn = backends.build_local_attention(
        backend, attention_dropout=0.0, softmax_scale=1 / math.sqrt(8)
    )
    got = attn(q, k, v, doc_ids=doc_ids)
    assert got.shape == q.shape
    torch.testing.assert_close(got, _reference_attention(q, k, v, doc_ids), rtol=1e-5, atol=1e-5)


def test_triton_kernel_backend_forward_backward():
    """Head dim 64: the real Triton kernels (interpreted on CPU), GQA and documents."""
    torch.manual_seed(0)
    fused = torch.randn(32, 2, (4 + 2 * 2) * 64, requires_grad=True)
    q, k, v = _qkv(s=32, b=2, hq=4, hkv=2, d=64, fused=fused)
    docs = torch.tensor([[0] * 10 + [1] * 22, [0] * 32], dtype=torch.int32)
    outs, grads = [], []
    for name in ("triton", "classic"):
        attn = backends.build_local_attention(name, attention_dropout=0.0, softmax_scale=0.125)
        out = attn(q, k, v, doc_ids=docs)
        (g,) = torch.autograd.grad((out * torch.linspace(-1, 1, 64)).sum(), [fused])
        outs.append(out)
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_triton_warns_once_about_dropout(caplog):
    attn = backends.build_local_attention("triton", attention_dropout=0.1, softmax_scale=0.35)
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        attn(q, k, v)
        attn(q, k, v)
    assert sum("not applied" in r.message for r in caplog.records) == 1


def test_classic_attention_dropout_is_applied_in_training_only():
    q, k, v = _qkv()
    attn = backends.build_local_attention(
        "classic", attention_dropout=0.5, softmax_scale=1 / math.sqrt(8)
    )
    torch.manual_seed(0)
    train = attn(q, k, v)
    attn.eval()
    assert not torch.allclose(train, attn(q, k, v))
    torch.testing.assert_close(attn(q, k, v), _reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_flash_attn_wiring_with_a_stand_in_module(monkeypatch):
    """The flash_attn v2 path's layouts and cu_seqlens, with a stand-in for the CUDA package."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p, softmax_scale, causal):  # [b, s, h, d]
        calls.append("dense")
        out = _reference_attention(*(t.transpose(0, 1) for t in (q, k, v)))
        return out.transpose(0, 1)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
        calls.append(("varlen", cu_q.tolist(), max_q))
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            seg = [t[start:end, None] for t in (q, k, v)]  # [n, 1, h, d]
            out[start:end] = _reference_attention(*seg)[:, 0]
        return out

    fake = types.ModuleType("flash_attn")
    fake.__version__ = "2.7.0"
    fake.flash_attn_func, fake.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    backends._load_flash_attn.cache_clear()
    try:
        attn = backends.build_local_attention(
            "sdpa", attention_dropout=0.0, softmax_scale=1 / math.sqrt(8)
        )
    finally:
        backends._load_flash_attn.cache_clear()
    assert attn._flash is not None
    monkeypatch.setattr(attn, "_flash_usable", lambda q: True)
    q, k, v = _qkv(hkv=2)
    torch.testing.assert_close(attn(q, k, v), _reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    got = attn(q, k, v, doc_ids=DOCS)
    torch.testing.assert_close(got, _reference_attention(q, k, v, DOCS), rtol=1e-5, atol=1e-5)
    assert calls == ["dense", ("varlen", [0, 5, 12, 16, 32], 16)]


def test_importing_the_model_does_not_import_triton():
    code = "import sys, megatron.model; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_bias_gelu_off_cuda_needs_no_triton_module():
    """The default bias-GeLU fusion on CPU computes with PyTorch's ops: our Triton module is
    not imported (triton is optional; PyTorch itself may import it when installed)."""
    code = (
        "import sys, torch, megatron.model as m\n"
        "c = m.ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2,"
        " padded_vocab_size=32, seq_length=8, bias_gelu_fusion=True)\n"
        "m.GPTModel(c).transformer.layers[0].mlp(torch.randn(8, 1, 16))\n"
        "sys.exit('megatron.ops.bias_gelu_triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    assert subprocess.run([sys.executable, "-c", code], check=False, env=env).returncode == 0


# ---------------------------------------------------------------- packed documents


def test_packed_documents_equal_separate_documents():
    """Each packed document's per-token losses equal running that document on its own."""
    model = build_model(seed=3, **LLAMA)
    batch = make_batch(1, seed=7, packed=True)
    packed = model(
        batch["tokens"], batch["position_ids"], labels=batch["labels"], doc_ids=batch["doc_ids"]
    )
    doc_ids = batch["doc_ids"][0]
    for doc in doc_ids.unique().tolist():
        idx = (doc_ids == doc).nonzero().flatten()
        sl = slice(idx[0].item(), idx[-1].item() + 1)
        alone = model(
            batch["tokens"][:, sl], batch["position_ids"][:, sl], labels=batch["labels"][:, sl]
        )
        torch.testing.assert_close(packed[:, sl], alone, rtol=1e-5, atol=1e-5)
    assert (batch["position_ids"][0, 1:] == 0).sum() >= 1  # positions did restart


# ---------------------------------------------------------------- loss


def test_bf16_autocast_with_fp32_parameters():
    """The training loop's mixed precision: fp32 weights, bf16 autocast. Every backend,
    recompute and the chunked loss run, give fp32 grads, and stay near the fp32 result;
    the chunked loss recomputes its logits in bf16 like its forward (equal to unchunked), and
    its gradients from the forward pass (one rounding of the hidden-state gradient instead of
    two) are at least as close to fp32 as the unchunked bf16 run's."""
    batch = make_batch(2, seed=1, packed=True)

    def run(autocast: bool, **overrides):
        model = build_model(seed=0, **LLAMA, **overrides)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward_loss(model, batch)
        loss.backward()
        assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
        return loss.item(), grads_of(model)

    fp32_loss, fp32_grads = run(False)
    bf16_loss, bf16_grads = run(True)
    recompute_logits = {"loss_chunk_size": 37, "loss_grad_in_forward": False}
    variants = [
        recompute_logits,
        {"loss_chunk_size": 37},
        {"attention_backend": "sdpa"},
        {"attention_backend": "triton"},
        {"recompute_granularity": "full", "recompute_method": "uniform"},
        {"recompute_granularity": "selective", **recompute_logits},
        {"recompute_granularity": "selective", "loss_chunk_size": 37},
    ]
    for overrides in variants:
        loss, grads = run(True, **overrides)
        assert loss == pytest.approx(fp32_loss, rel=1e-3), overrides
        assert_grads_close(grads, fp32_grads, rtol=3e-2)
        if overrides.get("attention_backend") is None:  # same math as the plain bf16 run
            assert loss == pytest.approx(bf16_loss, rel=1e-6), overrides
        if overrides.get("loss_grad_in_forward") is False or "loss_chunk_size" not in overrides:
            if overrides.get("attention_backend") is None:
                assert_grads_close(grads, bf16_grads, rtol=5e-3)  # bf16 rounding per chunk
        else:
            for name, want in fp32_grads.items():
                err = (grads[name] - want).norm() / want.norm()
                assert err <= 1.25 * (bf16_grads[name] - want).norm() / want.norm() + 1e-4, name


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_residual_stream_dtype_under_autocast(fp32_residual):
    """Under bf16 autocast the residual stream is bf16 (Megatron-LM's default), fp32 with
    --fp32-residual-connection; the norms return fp32 either way, and both stay near fp32."""
    batch = make_batch(2, seed=1)
    seen = {}
    model = build_model(seed=0, fp32_residual_connection=fp32_residual)
    layer = model.transformer.layers[1]
    layer.register_forward_pre_hook(lambda m, args: seen.update(stream=args[0].dtype))
    norm = layer.input_layernorm
    norm.register_forward_hook(lambda m, args, out: seen.update(norm=out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = forward_loss(model, batch)
    loss.backward()
    assert seen == {
        "stream": torch.float32 if fp32_residual else torch.bfloat16,
        "norm": torch.float32,
    }
    reference = forward_loss(build_model(seed=0), batch)
    assert loss.item() == pytest.approx(reference.item(), rel=2e-3)


def test_masked_lm_loss_single_rank():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    assert masked_lm_loss(losses, mask, None).item() == pytest.approx((1 + 3 + 4 + 5) / 4)
    assert masked_lm_loss(losses, torch.zeros_like(mask), None).item() == 0.0


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_deferred_wgrad_linear_matches_nn_linear(autocast):
    """``--delay-wgrad-compute``'s linear: the input and bias gradients at once, the weight's
    when its queue runs, accumulated into an existing ``.grad`` (micro-batches) as autograd
    does: the same values as ``nn.Linear``, in fp32 and under bf16 autocast."""
    from megatron.model.deferred_wgrad import WgradQueue, linear

    torch.manual_seed(3)
    mods = [torch.nn.Linear(16, 24) for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    queue = WgradQueue()
    grads = []
    for i, mod in enumerate(mods):
        x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(9), requires_grad=True)
        for step in range(2):  # the second backward accumulates into .grad
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = mod(x) if i == 0 else linear(x, mod, queue)
            out.float().pow(2).sum().backward()
            if i == 1:
                assert queue.pending == 1 and (step == 1) == (mod.weight.grad is not None)
                queue.run()
                assert queue.pending == 0
        assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
        grads.append([x.grad, mod.weight.grad, mod.bias.grad])
    tol = {"rtol": 1e-2, "atol": 1e-2} if autocast else {"rtol": 1e-6, "atol": 1e-6}
    for got, want in zip(grads[1], grads[0]):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_wgrad_of_bf16_weights_in_fp32(device):
    """With the queue's ``fp32_grads`` on (ZeRO 1 over micro-batches), a bf16 weight's
    gradient is created in fp32 straight out of the GEMM and the next backward adds to it;
    switched off again, a new gradient is bf16."""
    from megatron.model.deferred_wgrad import WgradQueue, linear

    torch.manual_seed(3)
    mod = torch.nn.Linear(16, 24, dtype=torch.bfloat16, device=device)
    x = torch.randn(5, 3, 16, dtype=torch.bfloat16, device=device)
    gy = torch.randn(5, 3, 24, dtype=torch.bfloat16, device=device)
    want = (gy.reshape(-1, 24).double().t() @ x.reshape(-1, 16).double()).float()
    queue = WgradQueue()
    queue.fp32_grads = True
    for _ in range(2):
        linear(x, mod, queue).backward(gy)
        queue.run()
    assert mod.weight.grad.dtype == torch.float32 and mod.bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mod.weight.grad, 2 * want, rtol=1e-2, atol=1e-2)
    mod.weight.grad = None
    queue.fp32_grads = False
    linear(x, mod, queue).backward(gy)
    queue.run()
    assert mod.weight.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- recompute


RECOMPUTE = [
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
    {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    {"recompute_granularity": "selective"},
]


@pytest.mark.parametrize(
    "recompute", RECOMPUTE, ids=["uniform1", "uniform2", "block1", "selective"]
)
def test_recompute_replays_dropout(recompute):
    """With dropout on, recomputation gives the same loss and gradients (same masks)."""
    dropout = {"attention_dropout": 0.2, "hidden_dropout": 0.2}
    batch = make_batch(2, seed=4, packed=True)
    out = []
    for extra in ({}, recompute):
        model = build_model(seed=9, **dropout, **extra)
        model.train()
        calls = []
        backend = model.transformer.layers[0].self_attention.core_attention.backend
        backend.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(123)
        loss = forward_loss(model, batch)
        loss.backward()
        out.append((loss.item(), grads_of(model), len(calls)))
    assert (out[0][2], out[1][2]) == (1, 2)  # the attention of layer 0 was recomputed
    assert out[1][0] == out[0][0]
    assert_grads_close(out[1][1], out[0][1], rtol=1e-6)


def test_sdpa_backend_in_the_model_matches_classic():
    batch = make_batch(2, seed=5, packed=True)
    out = []
    for backend in ("classic", "sdpa"):
        model = build_model(seed=4, attention_backend=backend, **LLAMA)
        loss = forward_loss(model, batch)
        loss.backward()
        out.append((loss.item(), grads_of(model)))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    assert_grads_close(out[1][1], out[0][1])


# ---------------------------------------------------------------- FLOPs and config


def test_model_flops_per_token():
    config = tiny_config(**LLAMA)
    model = GPTModel(config)
    non_embedding = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("embedding.")
    )
    dense = non_embedding + PADDED_VOCAB * 64  # + the (tied) output layer
    assert model_flops_per_token(config, 512) == 6 * dense + 6 * 2 * 512 * 64


def _parse(extra: list[str]):
    from megatron.initialize.argument_checks import validate_args
    from megatron.initialize.arguments import parse_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8",
            "--seq-length", "64", "--micro-batch-size", "1"]  # fmt: skip
    args = validate_args(parse_args(args_list=base + extra))
    args.padded_vocab_size = 128
    return args


def test_config_from_args():
    args = _parse(["--swiglu", "--normalization", "rmsnorm", "--use-rotary-position-embeddings",
                   "--num-key-value-heads", "2", "--disable-bias-linear", "--use-flash-attn",
                   "--recompute-granularity", "full", "--recompute-method", "block", "--bf16",
                   "--rotary-base", "500000", "--loss-chunk-size", "0"])  # fmt: skip
    config = ModelConfig.from_args(args)
    assert (config.normalization, config.position_embedding_type) == ("RMSNorm", "rope")
    assert (config.swiglu, config.add_bias_linear, config.num_key_value_heads) == (True, False, 2)
    assert config.impl.attention_backend == "sdpa" and config.rotary_theta == 500000.0
    assert (config.impl.recompute_method, config.impl.recompute_num_layers) == ("block", 1)
    assert config.params_dtype == torch.float32 and config.impl.loss_chunk_size == 0  # autocast
    assert config.ffn_hidden_size == 192 and config.kv_channels == 8
    default = ModelConfig.from_args(_parse([]))
    assert default == dataclasses.replace(
        tiny_config(), attention_dropout=0.1, hidden_dropout=0.1, loss_chunk_size=2048,
        bias_gelu_fusion=True,  # Megatron's default
        embedding_grads_in_place=True,  # training's .backward(); tests call autograd.grad
    )  # fmt: skip
    assert not ModelConfig.from_args(
        _parse(["--no-embedding-grads-in-place"])
    ).impl.embedding_grads_in_place
    assert ModelConfig.from_args(
        _parse(["--no-gradient-accumulation-fusion"])
    ).impl.embedding_grads_in_place  # the fp32 GEMM accumulation only
    assert not ModelConfig.from_args(_parse(["--no-bias-gelu-fusion"])).impl.bias_gelu_fusion
    on = ("fp32_residual_connection", "sp_rank_major_qkv", "bias_dropout_fusion")
    assert [getattr(default.impl, name) for name in on] == [False, True, True]
    switched = ModelConfig.from_args(
        _parse(["--fp32-residual-connection", "--no-sp-rank-major-qkv", "--no-bias-dropout-fusion"])
    )
    assert [getattr(switched.impl, name) for name in on] == [True, False, False]
    assert (
        ModelConfig.from_args(_parse(["--use-flash-attn-triton"])).impl.attention_backend
        == "triton"
    )


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"num_key_value_heads": 3}, "--num-key-value-heads 3"),
        ({"hidden_size": 60}, "--kv-channels"),
        ({"normalization": "BatchNorm"}, "--normalization"),
        ({"position_embedding_type": "rope", "rotary_percent": 0.1}, "--rotary-percent"),
        ({"recompute_granularity": "full", "recompute_num_layers": 3}, "--recompute-num-layers"),
        ({"loss_chunk_size": -1}, "--loss-chunk-size"),
        ({"sdpa_block_size": -1}, "--sdpa-block-size"),
    ],
)
def test_config_errors_name_the_flag(overrides, words):
    with pytest.raises(UsageError, match=words):
        tiny_config(**overrides)


def test_both_flash_flags_is_a_usage_error():
    args = _parse(["--use-flash-attn", "--use-flash-attn-triton"])
    with pytest.raises(UsageError, match="--use-flash-attn-triton"):
        ModelConfig.from_args(args)


@pytest.mark.parametrize("untie", [False, True], ids=["tied", "untied"])
def test_embedding_grads_in_place_match_autograd(untie, monkeypatch):
    """Training's in-place gradients (the loss's output-layer gradient set or added into
    .grad, the lookups adding their rows there) equal plain autograd's over two accumulated
    micro-batches; the tied weight's loss gradient does go in place."""
    import megatron.model.loss as loss_module

    calls, original = [], loss_module.add_to_grad_

    def recording(param, grad):
        calls.append(original(param, grad))
        return calls[-1]

    monkeypatch.setattr(loss_module, "add_to_grad_", recording)
    grads = []
    for in_place in (False, True):
        overrides = {"loss_chunk_size": 16, "untie_embeddings_and_output_weights": untie}
        model = build_model(seed=3, embedding_grads_in_place=in_place, **overrides)
        for seed in (1, 2):
            forward_loss(model, make_batch(2, seed)).backward()
        grads.append(grads_of(model))
    assert_grads_close(grads[1], grads[0], rtol=1e-6)
    assert calls == [True, True]  # the second micro-batch adds to the first's .grad


@pytest.mark.parametrize(
    "recompute, segments",
    [
        ({}, [(0, 3, False)]),
        (
            {"recompute_granularity": "full", "recompute_num_layers": 2},
            [(0, 2, True), (2, 3, True)],
        ),
        (
            {
                "recompute_granularity": "full",
                "recompute_method": "block",
                "recompute_num_layers": 2,
            },
            [(0, 1, True), (1, 2, True), (2, 3, False)],
        ),
    ],
    ids=["none", "uniform2", "block2"],
)
def test_parallelize_sets_the_recompute_segments(recompute, segments):
    """``parallelize`` (called by GPTModel's constructor) turns the recompute settings into the
    stack's checkpointed runs of layers; without SP the core attention stays local."""
    from megatron.model.attention import CoreAttention

    model = GPTModel(tiny_config(num_layers=3, **recompute))
    assert [tuple(s) for s in model.transformer.segments] == segments
    for layer in model.transformer.layers:
        assert isinstance(layer.self_attention.core_attention, CoreAttention)
        assert layer.self_attention.send_order_qkv is None
