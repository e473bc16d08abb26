"""Triton attention under the interpreter against a float64 oracle: forward, dQ/dK/dV, masks, varlen, dropout."""

import importlib
import math
import types

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from triton.runtime.interpreter import InterpretedFunction

from bertforge.kernels import _validate, attention, attention_qkvpacked, checks_values, reference
from bertforge.kernels._triton import config_label, poison_outputs
from bertforge.kernels._validate import HEAD_DIMS, check_attention_inputs
from bertforge.kernels.attention import (
    ARCHS,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    FWD_CONFIGS,
    AttentionProblem,
    attention_backward,
    attention_forward,
    draw_dropout_seed,
    shipped_configs,
)
from bertforge.kernels.dropout import quantised_probability
from bertforge.kernels.padding import padded_to_varlen, varlen_to_padded
from tests.conftest import assert_close_rel
from tests.kernels.dropout_mask import dropout_keep_mask

# The package re-exports the function under the module's name; fetch the module for monkeypatching.
attention_module = importlib.import_module("bertforge.kernels.attention")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def attention_math(q, k, v, key_padding_mask=None, keep=None, dropout_p=0.0):
    """Attention written out in float64, with an explicit dropout keep-mask; rows with no real key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    has_key = None
    if key_padding_mask is not None:
        has_key = key_padding_mask.any(-1)
        visible = key_padding_mask | ~has_key[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)
    if keep is not None:  # the kernels drop with the 16-bit quantised probability, and rescale by its keep rate
        probs = probs * keep / (1.0 - quantised_probability(dropout_p)[1])
    out = probs @ v
    return out if has_key is None else out * has_key[:, None, None, None]


def random_qkv(shape, dtype):
    return [torch.randn(shape, dtype=dtype).requires_grad_() for _ in range(3)]


def mask_from_lengths(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


def one_past_a_block(dtype, head_dim):
    """Lengths one past a whole number of blocks, for every block size a shipped config of this dtype and head_dim
    loops over (forward and dQ: key blocks, dK/dV: query blocks): the last block then holds a single row, which a
    loop stopping one block early would drop. (At length 1 that cannot show: the exact dQ is zero.)"""
    loops = [(FWD_CONFIGS, "BLOCK_N"), (DQ_CONFIGS, "BLOCK_N"), (DKDV_CONFIGS, "BLOCK_M")]
    blocks = {c.kwargs[size] for table, size in loops for arch in ARCHS
              for c in shipped_configs(table, head_dim, dtype.itemsize, arch)}
    return sorted((block + 1 for block in blocks), reverse=True)


def check_against_oracle(q, k, v, out, key_padding_mask=None, keep=None, dropout_p=0.0, rows=None):
    """Backprop a random dO through both and compare out, dq, dk, dv by relative error norm.

    `rows` (bool, (batch, seq)) restricts the comparison of out and dq to real query rows.
    """
    dtype = q.dtype
    d_out = torch.randn_like(out)
    out.backward(d_out)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = attention_math(*leaves, key_padding_mask=key_padding_mask, keep=keep, dropout_p=dropout_p)
    expected.backward(d_out.double())
    pick = (lambda t: t.transpose(1, 2)[rows]) if rows is not None else (lambda t: t)
    assert_close_rel(pick(out.detach()), pick(expected.detach()), dtype, "out")
    assert_close_rel(pick(q.grad), pick(leaves[0].grad), dtype, "dq")
    assert_close_rel(k.grad, leaves[1].grad, dtype, "dk")
    assert_close_rel(v.grad, leaves[2].grad, dtype, "dv")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_dim_and_dtype_matches_float64(dtype, head_dim):
    q, k, v = random_qkv((2, 2, 37, head_dim), dtype)
    with poison_outputs():
        out = attention(q, k, v)
        check_against_oracle(q, k, v, out)


@pytest.mark.parametrize("seqlen", [17, 113, 203, 256])
def test_odd_and_even_lengths_match_float64(seqlen):
    q, k, v = random_qkv((1, 2, seqlen, 64), torch.float16)
    with poison_outputs():
        check_against_oracle(q, k, v, attention(q, k, v))


def test_length_one():
    # Softmax over one key is constant: out = v, dv = dO, and the exact dq, dk are zero, so they are checked
    # against an absolute bound (fp16 round-off of rowsum(dO * O) against dO . v), not a relative one.
    q, k, v = random_qkv((3, 2, 1, 64), torch.float16)
    with poison_outputs():
        out = attention(q, k, v)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    assert_close_rel(out.detach(), v.detach().double(), torch.float16, "out")
    assert_close_rel(v.grad, d_out.double(), torch.float16, "dv")
    assert q.grad.abs().max() < 0.05 and k.grad.abs().max() < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_mask_with_very_different_lengths(dtype):
    # A fully real row, a row with one real token, a ragged one and one whose padding is not at the end.
    seqlen = 130
    mask = mask_from_lengths([130, 1, 77, 64], seqlen)
    mask[3] = torch.rand(seqlen) < 0.5
    mask[3, 5] = True
    q, k, v = random_qkv((4, 3, seqlen, 32), dtype)
    with poison_outputs():
        out = attention(q, k, v, key_padding_mask=mask)
        check_against_oracle(q, k, v, out, key_padding_mask=mask)


def test_sequence_without_real_tokens_gives_zeros_and_zero_gradients():
    mask = mask_from_lengths([5, 0], 40)
    q, k, v = random_qkv((2, 2, 40, 16), torch.float16)
    with poison_outputs():
        out = attention(q, k, v, key_padding_mask=mask)
        out.backward(torch.randn_like(out))
    assert out[1].abs().max() == 0
    for grad in (q.grad, k.grad, v.grad):
        assert grad[1].abs().max() == 0
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_float64_and_the_padded_layout(dtype):
    lengths = [1, 17, 113, 64, 3]
    max_seqlen = max(lengths)
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = random_qkv((sum(lengths), 2, 48), dtype)
    with poison_outputs():
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    d_out = torch.randn_like(out)
    out.backward(d_out)

    # The same problem in the padded layout, through the kernel and through the float64 oracle.
    (qp, mask), (kp, _), (vp, _) = (varlen_to_padded(t.detach(), cu_seqlens, max_seqlen) for t in (q, k, v))
    padded = [t.clone().requires_grad_() for t in (qp, kp, vp)]
    with poison_outputs():
        out_padded = attention(*padded, key_padding_mask=mask)
    out_padded.backward(varlen_to_padded(d_out, cu_seqlens, max_seqlen)[0])
    assert torch.equal(out, padded_to_varlen(out_padded.detach(), mask)), "varlen and padded outputs differ"
    for grad_varlen, t in zip((q.grad, k.grad, v.grad), padded):
        assert_close_rel(grad_varlen, padded_to_varlen(t.grad, mask), dtype, "varlen vs padded grad")

    oracle = [t.double().requires_grad_() for t in (qp, kp, vp)]
    expected = attention_math(*oracle, key_padding_mask=mask)
    expected.backward(varlen_to_padded(d_out.double(), cu_seqlens, max_seqlen)[0])
    assert_close_rel(out.detach(), padded_to_varlen(expected.detach(), mask), dtype, "out")
    for grad_varlen, t, name in zip((q.grad, k.grad, v.grad), oracle, "qkv"):
        assert_close_rel(grad_varlen, padded_to_varlen(t.grad, mask), dtype, f"d{name}")


def test_varlen_with_empty_sequences_and_longer_max_seqlen():
    lengths = [0, 9, 0, 30]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = random_qkv((sum(lengths), 1, 64), torch.float16)
    with poison_outputs():
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=50)
    expected = reference.attention(*(t.detach().double() for t in (q, k, v)), cu_seqlens=cu_seqlens)
    assert_close_rel(out.detach(), expected, torch.float16, "out")


def test_strided_inputs_from_a_fused_qkv_projection():
    batch, seqlen, heads, head_dim = 2, 50, 2, 32
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, dtype=torch.float16, requires_grad=True)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, unit last stride
    assert not q.is_contiguous()
    with poison_outputs():
        out = attention(q, k, v)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    leaf = qkv.detach().double().requires_grad_()
    expected = attention_math(*(leaf[:, :, i].transpose(1, 2) for i in range(3)))
    expected.backward(d_out.double())
    assert_close_rel(out.detach(), expected.detach(), torch.float16, "out")
    assert_close_rel(qkv.grad, leaf.grad, torch.float16, "dqkv")


@pytest.mark.parametrize("layout", ["packed", "padded", "masked"])
def test_qkv_packed_matches_float64_with_dropout_and_writes_one_gradient_buffer(layout, fresh_seed):
    """attention_qkvpacked against float64 with the kernels' own mask, every gradient in the one dqkv buffer
    (autograd goes from the op straight to qkv: no unbind, no stack of dq, dk, dv)."""
    heads, head_dim, p = 2, 32, 0.2
    lengths = [33, 5, 20]
    batch, seqlen = len(lengths), max(lengths)
    mask = mask_from_lengths(lengths, seqlen) if layout != "padded" else torch.ones(batch, seqlen, dtype=torch.bool)
    padded = torch.randn(batch, seqlen, 3, heads, head_dim, dtype=torch.float16)
    if layout == "packed":
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        qkv = padded[mask].requires_grad_()  # (tokens, 3, heads, head_dim)
        kwargs = dict(cu_seqlens=cu_seqlens, max_seqlen=seqlen)
    else:
        qkv = padded.requires_grad_()
        kwargs = dict(key_padding_mask=mask) if layout == "masked" else {}
    torch.manual_seed(fresh_seed)
    keep = dropout_keep_mask(batch, heads, seqlen, p, draw_dropout_seed(), qkv.device)
    torch.manual_seed(fresh_seed)
    with poison_outputs():
        out = attention_qkvpacked(qkv, dropout_p=p, **kwargs)
    assert type(out.grad_fn).__name__ == "QKVPackedAttentionFunctionBackward"
    assert [type(f).__name__ for f, _ in out.grad_fn.next_functions] == ["AccumulateGrad"]
    d_out = torch.randn_like(out)
    with poison_outputs():
        out.backward(d_out)

    leaf = padded.detach().double().requires_grad_()
    q, k, v = (leaf[:, :, i].transpose(1, 2) for i in range(3))
    expected = attention_math(q, k, v, key_padding_mask=mask, keep=keep, dropout_p=p).transpose(1, 2)
    if layout == "packed":
        expected = expected[mask]  # (tokens, heads, head_dim)
    expected.backward(d_out.double())
    assert_close_rel(out.detach(), expected.detach(), torch.float16, "out")
    assert_close_rel(qkv.grad, leaf.grad[mask] if layout == "packed" else leaf.grad, torch.float16, "dqkv")


def test_qkv_packed_reference_path_has_the_same_layouts(monkeypatch):
    monkeypatch.setenv("BERTFORGE_KERNELS", "reference")
    qkv = torch.randn(2, 7, 3, 2, 16)
    out = attention_qkvpacked(qkv)
    expected = attention_math(*(qkv[:, :, i].transpose(1, 2) for i in range(3))).transpose(1, 2).float()
    torch.testing.assert_close(out, expected)
    cu_seqlens = torch.tensor([0, 7, 14], dtype=torch.int32)
    packed = attention_qkvpacked(qkv.reshape(14, 3, 2, 16), cu_seqlens=cu_seqlens, max_seqlen=7)
    torch.testing.assert_close(packed, expected.reshape(14, 2, 16))


def test_qkv_packed_refuses_a_tensor_that_is_not_a_fused_projection():
    with pytest.raises(ValueError, match=r"shape \(batch, seq, 3, heads, head_dim\), got \(2, 7, 4, 2, 16\)"):
        attention_qkvpacked(torch.randn(2, 7, 4, 2, 16))
    with pytest.raises(ValueError, match=r"qkv must have shape \(total_tokens, 3, heads, head_dim\)"):
        attention_qkvpacked(torch.randn(2, 7, 3, 2, 16), cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))


def test_non_unit_last_stride_is_accepted():
    base = torch.randn(1, 2, 20, 64, 2, dtype=torch.float32)
    q = base[..., 0]  # last stride 2
    with poison_outputs():
        out = attention(q, q, q)
    assert_close_rel(out, attention_math(q, q, q), torch.float32, "out")


def test_the_autotuner_tries_the_lists_of_the_gpu_it_runs_on(monkeypatch):
    """On an H100 the sm_90 lists (tiles sized for wgmma), on an A100 and any other GPU the sm_80 ones."""
    monkeypatch.setattr(attention_module, "interpreting", lambda: False)  # the interpreter keeps one config
    q = types.SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: 2)
    for capability, table in [((9, 0), 90), ((8, 0), 80), ((8, 6), 80), ((12, 0), 80)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        for kernel, configs in [(attention_module._attention_fwd_kernel, FWD_CONFIGS),
                                (attention_module._attention_bwd_dkdv_kernel, DKDV_CONFIGS),
                                (attention_module._attention_bwd_dq_kernel, DQ_CONFIGS)]:
            for block_d, head_dim_class in [(16, 32), (32, 32), (64, 64), (128, 128)]:
                kept = kernel.early_config_prune(kernel.configs, {"Q": q, "BLOCK_D": block_d})
                assert kept == configs[table][(2, head_dim_class)], (capability, block_d, kernel.fn.__name__)
    assert DKDV_CONFIGS[90][(2, 64)] != DKDV_CONFIGS[80][(2, 64)]
    assert FWD_CONFIGS[80][(2, 32)] != FWD_CONFIGS[80][(2, 64)]


def _config_cases(table, kind):
    """One case per shipped config of any arch's lists: fp16 runs the 2-byte tables, fp32 the 4-byte ones, head_dim
    32, 64 and 128 (one per class)."""
    cases = {}
    for dtype in (torch.float16, torch.float32):
        for head_dim in (32, 64, 128):
            for arch in ARCHS:
                for config in shipped_configs(table, head_dim, dtype.itemsize, arch):
                    name = f"{kind}-{str(dtype)[6:]}-d{head_dim}-{config_label(config)}"
                    cases[name] = pytest.param(dtype, head_dim, config, id=name)
    return list(cases.values())


@pytest.mark.parametrize("dtype, head_dim, config", _config_cases(FWD_CONFIGS, "fwd"))
def test_every_forward_config(dtype, head_dim, config):
    _run_with_configs(dtype, head_dim, fwd=config)


@pytest.mark.parametrize("dtype, head_dim, config", _config_cases(DKDV_CONFIGS, "dkdv"))
def test_every_dkdv_config(dtype, head_dim, config):
    _run_with_configs(dtype, head_dim, dkdv=config)


@pytest.mark.parametrize("dtype, head_dim, config", _config_cases(DQ_CONFIGS, "dq"))
def test_every_dq_config(dtype, head_dim, config):
    _run_with_configs(dtype, head_dim, dq=config)


def _run_with_configs(dtype, head_dim, fwd=None, dkdv=None, dq=None):
    """Run explicit configs (the autotuner picks among them on a GPU) with a mask, dropout and lengths one past
    a block."""
    lengths, heads, p = one_past_a_block(dtype, head_dim), 2, 0.25
    batch, seqlen = len(lengths), max(lengths)
    mask = mask_from_lengths(lengths, seqlen)
    q, k, v = (t.detach() for t in random_qkv((batch, heads, seqlen, head_dim), dtype))
    seed = draw_dropout_seed()
    problem = AttentionProblem(q, mask, None, False, batch, heads, seqlen, head_dim, p, None, seed)
    d_out = torch.randn_like(q)
    with poison_outputs():
        out, lse = attention_forward(q, k, v, problem, config=fwd)
        dq_, dk_, dv_ = attention_backward(d_out, q, k, v, out, lse, problem, dkdv_config=dkdv, dq_config=dq)
    keep = dropout_keep_mask(batch, heads, seqlen, p, seed, q.device)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    expected = attention_math(*leaves, key_padding_mask=mask, keep=keep, dropout_p=p)
    expected.backward(d_out.double())
    assert_close_rel(out, expected.detach(), dtype, "out")
    for got, leaf, name in zip((dq_, dk_, dv_), leaves, "qkv"):
        assert_close_rel(got, leaf.grad, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropout_matches_float64_with_the_same_mask(dtype, fresh_seed):
    batch, heads, seqlen, p = 2, 2, 70, 0.3
    mask = mask_from_lengths([70, 33], seqlen)
    q, k, v = random_qkv((batch, heads, seqlen, 32), dtype)
    torch.manual_seed(fresh_seed)
    keep = dropout_keep_mask(batch, heads, seqlen, p, draw_dropout_seed(), q.device)
    torch.manual_seed(fresh_seed)  # attention draws the same seed
    with poison_outputs():
        out = attention(q, k, v, key_padding_mask=mask, dropout_p=p)
        check_against_oracle(q, k, v, out, key_padding_mask=mask, keep=keep, dropout_p=p)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("dtype, head_dim", [(torch.float16, 16), (torch.float32, 16), (torch.float16, 80)],
                         ids=["fp16-d16", "fp32-d16", "fp16-d80"])
def test_backward_with_dropout_at_lengths_one_past_a_block(layout, dtype, head_dim, fresh_seed):
    """Gradients with dropout against float64 with the kernels' own mask, through the autotuned path (the config
    the interpreter picks), at lengths one past a block: a last key block skipped by dQ, or a backward that
    regenerates another mask than the forward's (say, only with varlen offsets), fails here."""
    lengths, heads, p = one_past_a_block(dtype, head_dim) + [1], 2, 0.3
    batch, max_seqlen = len(lengths), max(lengths)
    mask = mask_from_lengths(lengths, max_seqlen)
    padded = [torch.randn(batch, heads, max_seqlen, head_dim, dtype=dtype) for _ in range(3)]
    if layout == "padded":
        inputs, layout_args = padded, {"key_padding_mask": mask}
        to_layout = to_padded = lambda t: t
    else:
        cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        inputs = [padded_to_varlen(t, mask) for t in padded]
        layout_args = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}
        to_layout = lambda t: padded_to_varlen(t, mask)
        to_padded = lambda t: varlen_to_padded(t, cu_seqlens, max_seqlen)[0]
    q, k, v = (t.requires_grad_() for t in inputs)
    torch.manual_seed(fresh_seed)
    keep = dropout_keep_mask(batch, heads, max_seqlen, p, draw_dropout_seed(), q.device)
    torch.manual_seed(fresh_seed)  # attention draws the same seed
    with poison_outputs():
        out = attention(q, k, v, dropout_p=p, **layout_args)
        d_out = torch.randn_like(out)
        out.backward(d_out)

    leaves = [t.detach().double().requires_grad_() for t in padded]
    expected = attention_math(*leaves, key_padding_mask=mask, keep=keep, dropout_p=p)
    expected.backward(to_padded(d_out.double()))  # zero at the padding rows varlen does not have
    assert_close_rel(out.detach(), to_layout(expected.detach()), dtype, "out")
    for got, leaf, name in zip((q.grad, k.grad, v.grad), leaves, "qkv"):
        assert_close_rel(got, to_layout(leaf.grad), dtype, f"d{name}")


def test_dropout_varlen_uses_the_padded_mask_positions(fresh_seed):
    lengths, p = [20, 45], 0.2
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 16, dtype=torch.float16) for _ in range(3))
    torch.manual_seed(fresh_seed)
    out = attention(q, k, v, cu_seqlens=cu_seqlens, dropout_p=p)
    torch.manual_seed(fresh_seed)
    keep = dropout_keep_mask(2, 2, max(lengths), p, draw_dropout_seed(), q.device)
    (qp, mask), (kp, _), (vp, _) = (varlen_to_padded(t, cu_seqlens, max(lengths)) for t in (q, k, v))
    expected = attention_math(qp, kp, vp, key_padding_mask=mask, keep=keep, dropout_p=p)
    assert_close_rel(out, padded_to_varlen(expected, mask), torch.float16, "out")


def test_dropout_same_seed_same_result_other_seed_other_result():
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float16) for _ in range(3))
    torch.manual_seed(123)
    first = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    again = attention(q, k, v, dropout_p=0.5)
    other = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_independence_across_heads(p):
    batch, heads, seqlen = 2, 3, 96
    keep = dropout_keep_mask(batch, heads, seqlen, p, draw_dropout_seed(), torch.device("cpu"))
    n = keep.numel()
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    # Different (batch, head) streams must be independent: two masks agree at rate (1-p)^2 + p^2.
    flat = keep.view(batch * heads, -1)
    for i in range(1, batch * heads):
        agreement = (flat[0] == flat[i]).float().mean().item()
        assert abs(agreement - ((1 - p) ** 2 + p**2)) < 0.05


def test_dropout_mask_is_the_same_whatever_the_tile():
    """Forward and backward kernels, in every config, draw the mask in their own tiles: it must not change."""
    seed = draw_dropout_seed()
    reference_mask = dropout_keep_mask(1, 2, 100, 0.3, seed, torch.device("cpu"))
    for block_m, block_n in [(32, 32), (128, 32), (16, 128)]:
        assert torch.equal(dropout_keep_mask(1, 2, 100, 0.3, seed, torch.device("cpu"), block_m, block_n),
                           reference_mask), (block_m, block_n)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_no_two_elements_share_random_bits(p):
    """Each Philox call feeds eight elements of a row: any two elements of a 32-column block, of two blocks or of
    two rows must agree at the rate of independent draws, (1-p)^2 + p^2, within 5 sigma (shared bits would agree
    always)."""
    heads, seqlen = 8, 128
    keep = dropout_keep_mask(1, heads, seqlen, p, draw_dropout_seed(), torch.device("cpu"))[0]
    blocks = keep.reshape(heads, seqlen, seqlen // 32, 32)  # [head, row, block, column in block]
    expected = (1 - p) ** 2 + p**2
    pairs = [(blocks[..., i], blocks[..., j]) for i in range(32) for j in range(i + 1, 32)]
    pairs += [(keep[:, :-1], keep[:, 1:]), (keep[:, 0::2], keep[:, 1::2])]  # neighbouring rows
    pairs += [(keep[..., :-shift], keep[..., shift:]) for shift in (32, 64)]  # the same place in other blocks
    for first, second in pairs:
        n = first.numel()
        agreement = (first == second).float().mean().item()
        assert abs(agreement - expected) < 5 * math.sqrt(expected * (1 - expected) / n), agreement


def test_backward_is_deterministic():
    q, k, v = random_qkv((2, 2, 90, 64), torch.float16)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        attention(q, k, v).backward(torch.ones(2, 2, 90, 64, dtype=torch.float16))
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@settings(max_examples=12, deadline=None)
@given(
    batch=st.integers(1, 3), heads=st.integers(1, 2), seqlen=st.integers(1, 140),
    head_dim=st.sampled_from(HEAD_DIMS), data=st.data(),
)
def test_fuzz_shapes_and_masks(batch, heads, seqlen, head_dim, data):
    lengths = data.draw(st.lists(st.integers(0, seqlen), min_size=batch, max_size=batch))
    assume(max(lengths) >= 2)  # with only one-key rows the exact dq, dk are all zero (see test_length_one)
    mask = mask_from_lengths(lengths, seqlen)
    q, k, v = random_qkv((batch, heads, seqlen, head_dim), torch.float16)
    with poison_outputs():
        out = attention(q, k, v, key_padding_mask=mask)
        check_against_oracle(q, k, v, out, key_padding_mask=mask)


@pytest.mark.parametrize("choice, triton_expected", [("reference", False), ("auto", True), ("triton", True)])
def test_dispatch(monkeypatch, choice, triton_expected):
    from bertforge.kernels.attention import AttentionFunction

    calls = []
    apply = AttentionFunction.apply
    monkeypatch.setattr(AttentionFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setenv("BERTFORGE_KERNELS", choice)
    q = torch.randn(1, 1, 8, 16)
    assert_close_rel(attention(q, q, q), attention_math(q, q, q), torch.float32, choice)
    assert bool(calls) == triton_expected  # TRITON_INTERPRET=1 is set: "auto" takes Triton on CPU


def q3(shape=(2, 2, 8, 16), dtype=torch.float16):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs_fn, error, message",
    [
        (lambda: dict(zip("qkv", q3(shape=(2, 2, 8, 24)))), ValueError, "head_dim"),
        (lambda: dict(zip("qkv", q3(shape=(2, 2, 8, 256)))), ValueError, "head_dim"),
        (lambda: dict(q=q3()[0], k=q3()[1].float(), v=q3()[2]), TypeError, "share a dtype"),
        (lambda: dict(q=q3()[0], k=q3(shape=(2, 2, 9, 16))[1], v=q3()[2]), ValueError, "same shape"),
        (lambda: dict(zip("qkv", q3(dtype=torch.float64))), TypeError, "dtype"),
        (lambda: dict(zip("qkv", q3(shape=(2, 8, 16)))), ValueError, "padded layout"),
        (lambda: dict(zip("qkv", q3()), key_padding_mask=torch.ones(2, 8)), TypeError, "bool"),
        (lambda: dict(zip("qkv", q3()), key_padding_mask=torch.ones(2, 9, dtype=torch.bool)), ValueError,
         "key_padding_mask must have shape"),
        (lambda: dict(zip("qkv", q3()), dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: dict(zip("qkv", q3(shape=(8, 2, 16))), cu_seqlens=torch.tensor([0, 8])), TypeError, "int32"),
        (lambda: dict(zip("qkv", q3(shape=(8, 2, 16))), cu_seqlens=torch.tensor([1, 8], dtype=torch.int32)),
         ValueError, "start at 0"),
        (lambda: dict(zip("qkv", q3(shape=(8, 2, 16))), cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)),
         ValueError, "non-decreasing"),
        (lambda: dict(zip("qkv", q3(shape=(8, 2, 16))), cu_seqlens=torch.tensor([0, 7], dtype=torch.int32)),
         ValueError, "total_tokens"),
        (lambda: dict(zip("qkv", q3(shape=(8, 2, 16))), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
                      max_seqlen=4), ValueError, "max_seqlen"),
        (lambda: dict(zip("qkv", q3()), max_seqlen=8), ValueError, "cu_seqlens"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs_fn, error, message):
    kwargs = kwargs_fn()
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(error, match=message):
        attention(q, k, v, **kwargs)


# --- host syncs: on a GPU, every read of a tensor's values from Python makes the host wait for the device --------

HOST_READS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"}


class HostReadRecorder(TorchFunctionMode):
    """Records calls that read tensor values on the host (torch.nonzero and Tensor.nonzero alike), and which
    kernels were launched. Triton's launcher is left out: under the interpreter it copies every argument to the
    host, on a GPU it reads none."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads, self.launches, self._launching = [], [], False
        run = InterpretedFunction.run

        def launch(kernel, *args, **kwargs):
            self.launches.append(kernel.__name__)
            self._launching = True
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self._launching = False

        monkeypatch.setattr(InterpretedFunction, "run", launch)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS and not self._launching:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def packed_qkv(lengths, heads=2, head_dim=16):
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return cu_seqlens, [torch.randn(sum(lengths), heads, head_dim).requires_grad_() for _ in range(3)]


def test_varlen_attention_on_a_gpu_reads_no_tensor_values(monkeypatch):
    """Forward and backward of a varlen call with dropout, as on a GPU without BERTFORGE_DEBUG=1, read no tensor
    value on the host: the cu_seqlens checks alone cost one sync per layer per micro-batch."""
    lengths = [17, 1, 5]
    cu_seqlens, (q, k, v) = packed_qkv(lengths)
    recorder = HostReadRecorder(monkeypatch)
    with recorder:  # the recorder sees the checks' reads of a CPU cu_seqlens
        check_attention_inputs(q, k, v, None, cu_seqlens, None, 0.1, None)
    assert "cpu" in recorder.reads

    recorder.reads.clear()
    monkeypatch.setattr(_validate, "checks_values", lambda t: False)  # what it says for CUDA tensors
    # The seed comes from torch's CPU generator: its .item() waits for no device.
    monkeypatch.setattr(attention_module, "draw_dropout_seed", lambda: 12345)
    with recorder:
        out = attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), dropout_p=0.1)
        # The backward as autograd calls it: under Tensor.backward() a TorchFunctionMode sees nothing.
        grads = out.grad_fn.apply(torch.ones_like(out))
    assert recorder.launches == ["_attention_fwd_kernel", "_attention_bwd_delta_kernel",
                                 "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"]
    assert all(torch.isfinite(g).all() for g in grads[:3])
    assert recorder.reads == []


def test_varlen_attention_on_a_gpu_needs_max_seqlen(monkeypatch):
    cu_seqlens, (q, k, v) = packed_qkv([3, 4])
    monkeypatch.setattr(_validate, "checks_values", lambda t: False)
    with pytest.raises(ValueError, match="max_seqlen must be given with cu_seqlens on a GPU"):
        attention(q, k, v, cu_seqlens=cu_seqlens)


def test_values_are_checked_on_device_tensors_only_with_bertforge_debug(monkeypatch):
    on_device = torch.empty(2, device="meta")  # any tensor not on the CPU
    monkeypatch.delenv("BERTFORGE_DEBUG", raising=False)
    assert checks_values(torch.empty(2)) and not checks_values(on_device)
    monkeypatch.setenv("BERTFORGE_DEBUG", "1")
    assert checks_values(on_device)
