"""The fused Triton kernels compiled for the GPU, at the 1.3B model's sizes (vocabulary 50304,
hidden 2048) and in bf16, against fp64 references. The CPU suite runs the same kernels in the
interpreter (tests/test_fused_ops.py); these need CUDA and are skipped without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron.model.loss import output_layer_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def test_fused_cross_entropy_bf16_vocab_50304():
    """Chunked loss with the fused kernels: loss and both gradients against fp64; the fused
    and unfused chunked paths agree as closely as bf16 rounding allows."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    s, b, h, v = 1024, 1, 2048, 50304
    hidden = (torch.randn(s, b, h, device=dev) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, device=dev) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (b, s), device=dev)
    upstream = torch.rand(b, s, device=dev)
    ref_in = [t.detach().double().requires_grad_() for t in (hidden, weight)]
    logits = F.linear(ref_in[0].view(s * b, h), ref_in[1])
    ref_loss = F.cross_entropy(logits, labels.t().reshape(-1), reduction="none").view(s, b).t()
    ref_grads = torch.autograd.grad((ref_loss * upstream.double()).sum(), ref_in)
    for fused in (False, True):
        loss = output_layer_cross_entropy(hidden, weight, labels, 256, fused=fused)
        grads = torch.autograd.grad((loss * upstream).sum(), [hidden, weight])
        assert loss.dtype == torch.float32
        assert _rel_err(loss, ref_loss.detach()) < 1e-3, fused
        for name, g, w in zip(("hidden", "weight"), grads, ref_grads):
            assert g.dtype == torch.bfloat16
            assert _rel_err(g, w) < 1e-2, (fused, name, _rel_err(g, w))
        # The mask's path: gradients from the forward pass, scaled in backward (by 0.5).
        out = output_layer_cross_entropy(hidden, weight, labels, 256, fused, loss_mask_bs=upstream)
        grads = torch.autograd.grad(0.5 * out.masked_sum, [hidden, weight])
        assert _rel_err(out.per_token, ref_loss.detach()) < 1e-3, fused
        for name, g, w in zip(("hidden", "weight"), grads, ref_grads):
            assert g.dtype == torch.bfloat16
            assert _rel_err(g, 0.5 * w) < 1e-2, (fused, "in forward", name, _rel_err(g, 0.5 * w))


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_fused_add_norm_bf16_hidden_2048(rms):
    """``--fused-residual-norm``'s kernels: fp32 residual + bf16 branch (+ its linear's bf16
    bias, with LayerNorm), bf16 norm weights and output, 8192 rows (more than the backward's
    program count)."""
    from megatron.ops.add_norm_triton import fused_add_norm

    torch.manual_seed(1)
    dev = torch.device("cuda")
    h = 2048
    norm = (torch.nn.RMSNorm(h, eps=1e-5) if rms else torch.nn.LayerNorm(h, eps=1e-5)).to(dev)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(1 + 0.1 * torch.randn(h, device=dev))
    norm = norm.bfloat16()
    x = torch.randn(4096, 2, h, device=dev, requires_grad=True)
    y = torch.randn(4096, 2, h, device=dev).bfloat16().requires_grad_()
    grad_r = torch.randn_like(x)
    grad_out = torch.randn(4096, 2, h, device=dev).bfloat16()
    y_bias = None if rms else torch.randn(h, device=dev).bfloat16().requires_grad_()
    r, out = fused_add_norm(x, y, norm, torch.bfloat16, y_bias)
    assert (r.dtype, out.dtype) == (torch.float32, torch.bfloat16)
    torch.autograd.backward([r, out], [grad_r, grad_out])
    params = list(norm.parameters())
    ref_in = [t.detach().double().requires_grad_() for t in [x, y, *params]]
    ref_r = ref_in[0] + ref_in[1]
    if y_bias is not None:
        ref_y_bias = y_bias.detach().double().requires_grad_()
        ref_r = ref_r + ref_y_bias
    ref_out = (
        F.rms_norm(ref_r, (h,), ref_in[2], 1e-5)
        if rms
        else F.layer_norm(ref_r, (h,), ref_in[2], ref_in[3], 1e-5)
    )
    torch.autograd.backward([ref_r, ref_out], [grad_r.double(), grad_out.double()])
    got = [r, out, x.grad, y.grad, *(p.grad for p in params)]
    want = [ref_r, ref_out, *(t.grad for t in ref_in)]
    names = ["r", "out", "dx", "dy", "dw", "db"][: len(got)]
    if y_bias is not None:
        got, want, names = got + [y_bias.grad], want + [ref_y_bias.grad], names + ["dyb"]
    for name, g, w in zip(names, got, want):
        assert _rel_err(g, w.detach()) < 1e-2, (name, _rel_err(g, w.detach()))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_bf16_ffn_8192(approximate):
    """The bias-GeLU kernels at the 1.3B MLP's width: bf16 product, fp32 bias, 8192 rows."""
    from megatron.ops import bias_gelu

    torch.manual_seed(2)
    dev = torch.device("cuda")
    x = torch.randn(4096, 2, 8192, device=dev).bfloat16().requires_grad_()
    bias = (0.1 * torch.randn(8192, device=dev)).requires_grad_()
    grad = torch.randn(4096, 2, 8192, device=dev).bfloat16()
    y = bias_gelu(x, bias, approximate)
    y.backward(grad)
    ref_in = [t.detach().double().requires_grad_() for t in (x, bias)]
    ref = F.gelu(ref_in[0] + ref_in[1], approximate=approximate)
    ref.backward(grad.double())
    assert (y.dtype, x.grad.dtype, bias.grad.dtype) == (torch.bfloat16,) * 2 + (torch.float32,)
    for name, g, w in [("y", y, ref), ("dx", x.grad, ref_in[0].grad),
                       ("db", bias.grad, ref_in[1].grad)]:  # fmt: skip
        assert _rel_err(g, w.detach()) < 1e-2, (name, _rel_err(g, w.detach()))


@pytest.mark.parametrize("kv_heads", [16, 2])
def test_rank_major_qkv_under_autocast_bf16(kv_heads):
    """The QKV projection in send order (SP 4, 1.3B widths) under bf16 autocast, fp32 weights
    as training keeps them: output and gradients against fp64, as close as F.linear's."""
    from megatron.model.rank_major_qkv import rank_major_linear, rank_major_rows

    torch.manual_seed(0)
    dev = torch.device("cuda")
    heads, d, sp, s, b = 16, 128, 4, 2048, 1
    linear = torch.nn.Linear(2048, (heads + 2 * kv_heads) * d, device=dev)
    x = torch.randn(s, b, 2048, device=dev, requires_grad=True)
    rows = rank_major_rows(heads, kv_heads, d, sp, dev)
    upstream = torch.randn(sp, s, b, rows.numel() // sp, device=dev)
    ref_params = [t.detach().double().requires_grad_() for t in (x, linear.weight, linear.bias)]
    ref = F.linear(*ref_params)[..., rows].unflatten(-1, (sp, -1)).movedim(2, 0)
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), ref_params)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        widths = None if kv_heads % sp else (heads // sp * d, *(2 * (kv_heads // sp * d,)))
        out = rank_major_linear(x, linear, rows, sp, widths)
        plain = linear(x)[..., rows].unflatten(-1, (sp, -1)).movedim(2, 0)
    assert out.dtype == torch.bfloat16
    params = [x, linear.weight, linear.bias]
    grads = torch.autograd.grad((out * upstream).sum(), params)
    plain_grads = torch.autograd.grad((plain * upstream).sum(), params)
    assert _rel_err(out, ref.detach()) < 1.5 * _rel_err(plain, ref.detach()) + 1e-4
    for g, p, w, pg in zip(grads, params, ref_grads, plain_grads):
        assert g.dtype == p.dtype
        assert _rel_err(g, w) < 1.5 * _rel_err(pg, w) + 1e-4


def test_embedding_grads_in_place_on_cuda_are_deterministic():
    """The in-place embedding gradients (sort-based ``index_put_``, many repeated token ids):
    bitwise the same from run to run, and equal to plain autograd's up to the fp32 summation
    order, for the lookup alone and in a model under bf16 autocast (classic attention, whose
    backward is deterministic, unlike cuDNN's)."""
    import dataclasses

    from megatron.model import GPTModel, ModelConfig, masked_lm_loss
    from megatron.model.inplace_grad import embedding_lookup

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 8192), generator=gen).to(dev)  # many repeats
    grad_out = torch.randn(2, 8192, 256, generator=gen).to(dev)
    start = torch.randn(512, 256, generator=gen).to(dev)
    results = []
    for _ in range(2):
        emb = torch.nn.Embedding(512, 256, device=dev)
        emb.weight.grad = start.clone()
        embedding_lookup(ids, emb, in_place=True).backward(grad_out)
        results.append(emb.weight.grad)
    assert torch.equal(results[0], results[1])
    want = start.double().index_add_(0, ids.reshape(-1), grad_out.reshape(-1, 256).double())
    assert _rel_err(results[0], want) < 1e-5  # fp32 sums of ~256 rows per id

    config = ModelConfig(
        num_layers=2, hidden_size=256, num_attention_heads=4, padded_vocab_size=512,
        seq_length=1024, attention_dropout=0.0, hidden_dropout=0.0, loss_chunk_size=256,
        attention_backend="classic",
    )  # fmt: skip
    tokens = ids[:, :1024]
    labels, mask = torch.roll(tokens, -1, 1), torch.ones(2, 1024, device=dev)
    positions = torch.arange(1024, device=dev).expand(2, -1)
    runs = []
    for in_place in (False, True, True):
        torch.manual_seed(0)
        model = GPTModel(dataclasses.replace(config, embedding_grads_in_place=in_place)).to(dev)
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses = model(tokens, positions, labels=labels, loss_mask=mask)
                masked_lm_loss(losses, mask, None).backward()
        runs.append({n: p.grad for n, p in model.named_parameters()})
    for name, plain in runs[0].items():
        assert torch.equal(runs[1][name], runs[2][name]), name
        assert _rel_err(runs[1][name], plain.double()) < 1e-5, name
