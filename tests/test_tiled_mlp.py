"""--tiled-mlp-chunk-size: the MLP over tiles of tokens gives the untiled results, forward
and backward, and keeps no [s, ffn] tensor for the whole sequence."""

from __future__ import annotations

import pytest
import torch
from model_utils import (
    LLAMA,
    assert_grads_close,
    build_model,
    forward_loss,
    grads_of,
    make_batch,
    tiny_config,
)

from megatron.model.deferred_wgrad import WgradQueue
from megatron.model.mlp import ParallelMLP
from megatron.model.parallelize import apply_tiled_mlp

GELU = {"swiglu": False, "add_bias_linear": True}
SWIGLU = {"swiglu": True, "add_bias_linear": False}
S, B, H = 37, 2, 16  # a sequence the tiles do not divide


def _mlp(style: dict, chunk: int, fusion: bool = False, dtype=torch.float64) -> ParallelMLP:
    config = tiny_config(hidden_size=H, num_attention_heads=2, bias_gelu_fusion=fusion, **style)
    torch.manual_seed(3)
    mlp = ParallelMLP(config).to(dtype)
    mlp.tile_tokens = chunk
    return mlp


def _run(mlp: ParallelMLP, x: torch.Tensor, gy: torch.Tensor, add_output_bias: bool = True):
    x = x.clone().requires_grad_()
    y = mlp(x, add_output_bias=add_output_bias)
    y.backward(gy)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in mlp.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize(
    "style", [GELU, SWIGLU, {**GELU, "fusion": True}], ids=["gelu", "swiglu", "bias-gelu-fusion"]
)
@pytest.mark.parametrize("add_output_bias", [True, False])
def test_tiled_equals_untiled_float64(style, add_output_bias):
    style = dict(style)
    fusion = style.pop("fusion", False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    gy = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    want = _run(_mlp(style, 0, fusion), x, gy, add_output_bias)
    got = _run(_mlp(style, 8, fusion), x, gy, add_output_bias)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        if want[2][name] is None:
            assert got[2][name] is None, name
        else:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-12, atol=1e-12)


def test_tiled_under_bf16_autocast():
    """The recomputation in backward runs under the forward's autocast (bf16 tolerance)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S, B, H, generator=g)
    gy = torch.randn(S, B, H, generator=g)
    out = []
    for chunk in (0, 8):
        mlp = _mlp(SWIGLU, chunk, dtype=torch.float32)
        with torch.autocast("cpu", torch.bfloat16):
            xr = x.clone().requires_grad_()
            y = mlp(xr)
        assert y.dtype == torch.bfloat16
        y.backward(gy.bfloat16())
        out.append((y.float(), xr.grad, [p.grad for p in mlp.parameters()]))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=2e-2, atol=2e-2)
    for a, b in zip(out[1][2], out[0][2]):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "recompute",
    [
        {},
        {"recompute_granularity": "full", "recompute_num_layers": 1},
        {"recompute_granularity": "selective"},
    ],
    ids=["none", "full", "selective"],
)
@pytest.mark.parametrize("arch", [LLAMA, {}], ids=["llama", "gpt"])
def test_model_with_tiled_mlp_matches(recompute, arch):
    batch = make_batch(2, seed=7, packed=True)
    out = []
    for chunk in (0, 24):
        model = build_model(seed=5, tiled_mlp_chunk_size=chunk, **arch, **recompute).double()
        assert all(layer.mlp.tile_tokens == chunk for layer in model.transformer.layers)
        loss = forward_loss(model, batch)
        loss.backward()
        out.append((loss.item(), grads_of(model)))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-12)
    assert_grads_close(out[1][1], out[0][1], rtol=1e-10)


def test_tiled_mlp_computes_weight_gradients_itself_under_deferral():
    """--delay-wgrad-compute composes: the tiled MLP's gradients are not queued (they are
    summed over its tiles in its backward); other queues stay."""
    model = build_model(seed=1)
    mlp = model.transformer.layers[0].mlp
    mlp.set_wgrad_queue(WgradQueue())
    apply_tiled_mlp(model.transformer, tiny_config(tiled_mlp_chunk_size=16))
    assert mlp.dense_h_to_4h.wgrad_queue is None and mlp.dense_4h_to_h.wgrad_queue is None
    assert mlp.tile_tokens == 16


@pytest.mark.parametrize("style", [GELU, SWIGLU], ids=["gelu", "swiglu"])
def test_no_saved_tensor_larger_than_a_tile(style):
    """Every tensor saved for backward inside the MLP (forward and the recomputation in
    backward) has at most chunk x b x (gate|up width) elements, except the MLP input itself;
    untiled, the [s, b, ffn] ones are there."""
    seq, chunk = 64, 8
    g = torch.Generator().manual_seed(2)
    x = torch.randn(seq, B, H, generator=g, dtype=torch.float64)
    gy = torch.randn(seq, B, H, generator=g, dtype=torch.float64)
    largest = {}
    for tile in (0, chunk):
        mlp = _mlp(style, tile)
        up = mlp.dense_h_to_4h.out_features
        params = {id(p) for p in mlp.parameters()}
        sizes = []
        xr = x.clone().requires_grad_()

        def pack(t, xr=xr, params=params, sizes=sizes):
            if t is not xr and id(t) not in params and t.data_ptr() != xr.data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(xr).backward(gy)
        largest[tile] = max(sizes)
    assert largest[chunk] <= chunk * B * up
    assert largest[0] >= seq * B * mlp.dense_4h_to_h.in_features
