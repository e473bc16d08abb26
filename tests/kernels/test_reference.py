"""The plain-PyTorch path (what training runs on a CPU) against float64 oracles: bucketed varlen attention,
attention dropout and the CPU-cheap dropout op."""

import pytest
import torch

from bertforge.kernels import Dropout, dropout, reference
from bertforge.kernels.dropout import keep_mask
from bertforge.kernels.padding import padded_to_varlen, varlen_to_padded
from bertforge.kernels.reference import _length_bucket
from tests.conftest import assert_close_rel
from tests.kernels.test_attention import attention_math


def packed_qkv(lengths, heads=2, head_dim=16, dtype=torch.float64):
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return cu_seqlens, [torch.randn(sum(lengths), heads, head_dim, dtype=dtype).requires_grad_() for _ in range(3)]


def test_length_buckets():
    assert [_length_bucket(n, 128) for n in (1, 16, 17, 32, 33, 100, 128)] == [16, 16, 32, 32, 64, 128, 128]
    assert _length_bucket(40, longest=40) == 40  # never wider than the batch's longest sequence
    assert _length_bucket(5, longest=9) == 9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_varlen_buckets_match_the_float64_padded_oracle(dtype):
    # Lengths in five buckets (16, 32, 64, 128 and the 150-wide top one), bucket edges, empty sequences.
    lengths = [0, 1, 16, 17, 31, 33, 64, 65, 0, 128, 150, 7]
    cu_seqlens, (q, k, v) = packed_qkv(lengths, dtype=dtype)
    out = reference.attention(q, k, v, cu_seqlens=cu_seqlens)
    d_out = torch.randn_like(out)
    out.backward(d_out)

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    padded = [varlen_to_padded(t, cu_seqlens, max(lengths)) for t in leaves]
    mask = padded[0][1]
    expected = padded_to_varlen(attention_math(*(p for p, _ in padded), key_padding_mask=mask), mask)
    expected.backward(d_out.double())
    tol = torch.float32  # float64 runs are held to the tightest tolerance we have
    assert_close_rel(out.detach(), expected.detach(), tol, "out")
    for name, t, ref in zip("qkv", (q, k, v), leaves):
        assert_close_rel(t.grad, ref.grad, tol, f"d{name}")


def test_padded_dropout_matches_the_oracle_with_the_replayed_mask(fresh_seed):
    batch, heads, seqlen, p = 3, 2, 20, 0.3
    q, k, v = (torch.randn(batch, heads, seqlen, 16, dtype=torch.float64).requires_grad_() for _ in range(3))
    mask = torch.arange(seqlen)[None, :] < torch.tensor([20, 5, 0])[:, None]  # and one all-padding sequence
    torch.manual_seed(fresh_seed + 1)
    out = reference.attention(q, k, v, key_padding_mask=mask, dropout_p=p)
    torch.manual_seed(fresh_seed + 1)
    keep, p_eff = keep_mask((batch, heads, seqlen, seqlen), p)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = attention_math(*leaves, key_padding_mask=mask, keep=keep.double(), dropout_p=p_eff)
    expected.backward(d_out)
    assert 0 < keep.float().mean() < 1
    for name, got, ref in [("out", out, expected)] + [(f"d{n}", a.grad, b.grad) for n, a, b in zip("qkv", (q, k, v), leaves)]:
        assert_close_rel(got.detach(), ref.detach(), torch.float32, name)


def test_varlen_dropout_in_one_bucket_equals_the_padded_path(fresh_seed):
    lengths = [20, 30, 17, 25]  # all in the 32-wide bucket, capped at the longest, 30: one padded call
    cu_seqlens, (q, k, v) = packed_qkv(lengths)
    torch.manual_seed(fresh_seed + 1)
    out = reference.attention(q, k, v, cu_seqlens=cu_seqlens, dropout_p=0.2)
    padded = [varlen_to_padded(t.detach(), cu_seqlens, max(lengths)) for t in (q, k, v)]
    mask = padded[0][1]
    torch.manual_seed(fresh_seed + 1)
    expected = reference.attention(*(t for t, _ in padded), key_padding_mask=mask, dropout_p=0.2)
    torch.testing.assert_close(out.detach(), padded_to_varlen(expected, mask), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, reference.attention(q, k, v, cu_seqlens=cu_seqlens)), "dropout did nothing"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_in_every_16_bit_lane(p):
    """Each 64-bit draw feeds four consecutive elements: each of the four lanes must keep at 1 - p.

    A generator that leaves the top bit of its 64-bit words at zero would keep every fourth element always.
    """
    keep, p_eff = keep_mask((250_000, 4), p)
    assert abs(p_eff - p) <= 2**-17
    n = keep.shape[0]
    sigma = (p_eff * (1 - p_eff) / n) ** 0.5
    rates = keep.double().mean(0)
    assert ((rates - (1 - p_eff)).abs() < 5 * sigma).all(), f"lane keep rates {rates.tolist()}, want {1 - p_eff}"


def test_dropout_scales_kept_elements_and_zeroes_the_rest(fresh_seed):
    x = torch.randn(1000, 37, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(fresh_seed + 1)
    y = dropout(x, 0.25)
    torch.manual_seed(fresh_seed + 1)
    keep, p_eff = keep_mask(x.shape, 0.25)
    torch.testing.assert_close(y, torch.where(keep, x / (1 - p_eff), 0.0), rtol=1e-15, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, torch.where(keep, g / (1 - p_eff), 0.0), rtol=1e-15, atol=0)
    # Unbiased: the mean over many draws of a constant input is the input.
    ones = torch.ones(2_000_000)
    assert abs(dropout(ones, 0.25).mean().item() - 1.0) < 5 * (0.25 / 0.75 / ones.numel()) ** 0.5


def test_dropout_draws_change_and_replay_with_the_seed():
    x = torch.ones(64, 64)
    torch.manual_seed(7)
    first, second = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.5), first)
    assert not torch.equal(first, second)


def test_dropout_module_acts_only_in_training_and_rejects_bad_p():
    layer = Dropout(0.5)
    x = torch.randn(100, 10)
    assert not torch.equal(layer(x), x)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(dropout(x, 0.0), x)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            Dropout(bad)
        with pytest.raises(ValueError, match="dropout probability"):
            dropout(x, bad)
