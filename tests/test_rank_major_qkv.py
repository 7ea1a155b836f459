"""The QKV projection in send order equals ``nn.Linear`` with its columns reordered."""

import pytest
import torch

from megatron.model.rank_major_qkv import rank_major_linear, rank_major_rows


def test_rows_follow_the_head_blocks_of_each_rank():
    # 4 q heads, 2 kv heads, d 1, sp 2: rank 0 has q 0,1, k 0, v 0; rank 1 q 2,3, k 1, v 1
    assert rank_major_rows(4, 2, 1, 2).tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    # one kv head, sp 2: both ranks use it
    assert rank_major_rows(2, 1, 2, 2).tolist() == [0, 1, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    "heads,kv_heads,sp,bias", [(8, 8, 4, True), (8, 4, 2, True), (8, 2, 4, False), (4, 1, 2, True)]
)
def test_matches_linear_forward_and_backward(heads, kv_heads, sp, bias):
    torch.manual_seed(0)
    d, hidden, s, b = 4, 16, 6, 2
    linear = torch.nn.Linear(hidden, (heads + 2 * kv_heads) * d, bias=bias, dtype=torch.float64)
    x = torch.randn(s, b, hidden, dtype=torch.float64, requires_grad=True)
    rows = rank_major_rows(heads, kv_heads, d, sp)
    widths = None if kv_heads % sp else (heads // sp * d, *(2 * (kv_heads // sp * d,)))
    out = rank_major_linear(x, linear, rows, sp, widths)  # [p, s, b, c]
    ref = linear(x)[..., rows].unflatten(-1, (sp, -1)).movedim(2, 0)
    torch.testing.assert_close(out, ref)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *linear.parameters()], grad)
    want = torch.autograd.grad(ref, [x, *linear.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
