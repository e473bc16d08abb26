"""Fused dropout + residual-add + LayerNorm: the Triton kernels (run by the interpreter on CPU) against a float64 reference."""

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bertforge.kernels import reference
from bertforge.kernels._triton import poison_outputs
from bertforge.kernels.dropout import draw_dropout_seed, quantised_probability
from bertforge.kernels.layer_norm import MAX_N, layer_norm
from conftest import assert_close_rel
from tests.kernels.dropout_mask import row_dropout_keep_mask

# The package re-exports the function under the module's name, so fetch the module itself for monkeypatching.
layer_norm_module = importlib.import_module("bertforge.kernels.layer_norm")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, dtype, with_residual, param_dtype=None):
    """Fresh random x (mean away from 0, so the kernel must subtract it), residual, weight and bias."""
    n = shape[-1]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    residual = torch.randn(shape).to(dtype) if with_residual else None
    weight = (1 + 0.2 * torch.randn(n)).to(param_dtype)
    bias = (0.2 * torch.randn(n)).to(param_dtype)
    return x, weight, bias, residual


def check_against_float64(x, weight, bias, residual, eps=1e-12, dy=None, dropout_p=0.0):
    """Forward and backward through the Triton path with poisoned outputs; y and every gradient vs float64 (with
    dropout: the kernels' own mask, drawn from the same seed, applied in float64)."""
    inputs = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    leaves = {name: t.detach().requires_grad_() for name, t in inputs.items() if t is not None}
    leaves64 = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}  # same rounded values

    state = torch.get_rng_state()
    with poison_outputs():
        y = layer_norm(**leaves, eps=eps, dropout_p=dropout_p)
        assert type(y.grad_fn).__name__ == "LayerNormFunctionBackward", "the Triton path did not run"
        dy = torch.randn_like(y) if dy is None else dy
        grads = torch.autograd.grad(y, list(leaves.values()), dy)
    x64 = leaves64["x"]
    if dropout_p > 0.0:
        torch.set_rng_state(state)  # the seed the call drew
        keep = row_dropout_keep_mask(x.shape, dropout_p, draw_dropout_seed())
        x64 = x64 * keep / (1.0 - quantised_probability(dropout_p)[1])
    y64 = reference.layer_norm(x64, leaves64["weight"], leaves64["bias"], eps=eps, residual=leaves64.get("residual"))
    grads64 = torch.autograd.grad(y64, list(leaves64.values()), dy.double())

    stream = residual if residual is not None else x
    assert y.dtype == stream.dtype
    assert_close_rel(y.detach(), y64.detach(), x.dtype, "y")
    for (name, leaf), grad, grad64 in zip(leaves.items(), grads, grads64):
        assert grad.dtype == leaf.dtype, f"d{name} has dtype {grad.dtype}, its input {leaf.dtype}"
        assert_close_rel(grad, grad64, x.dtype, f"d{name}")


# Every N with 1 row and with 7 (4 backward programs of 2, 2, 2, 1 rows); 130 rows (chunks of 33 and a last of
# 31) only for BERT-base's N, as the interpreter spends ~5 ms per bf16 row.
ROWS_AND_N = [(rows, n) for rows in (1, 7) for n in (16, 100, 384, 768, 1024)] + [(130, 768)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("rows, n", ROWS_AND_N)
def test_forward_and_gradients_match_float64(rows, n, with_residual, dtype):
    check_against_float64(*make_inputs((rows, n), dtype, with_residual))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_largest_supported_row(dtype):
    check_against_float64(*make_inputs((3, MAX_N), dtype, with_residual=True))


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 40), n=st.integers(8, 2048),
       dtype=st.sampled_from(DTYPES), with_residual=st.booleans())
def test_random_shapes_match_float64(batch, seq, n, dtype, with_residual):
    check_against_float64(*make_inputs((batch, seq, n), dtype, with_residual), eps=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("rows, n", [(5, 768), (3, 100)])
def test_dropout_matches_float64_with_the_kernels_mask(rows, n, with_residual, dtype):
    """Dropout of x before the residual add; the backward regenerates the mask for dx and leaves dresidual whole."""
    check_against_float64(*make_inputs((rows, n), dtype, with_residual), dropout_p=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_half_sublayer_output_on_a_float32_stream(dtype, dropout_p):
    """Under autocast: x in half precision, residual stream and parameters fp32; y and dresidual in fp32."""
    x, weight, bias, residual = make_inputs((6, 384), dtype, with_residual=True, param_dtype=torch.float32)
    check_against_float64(x, weight, bias, residual.float(), dropout_p=dropout_p)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_row_dropout_keep_rate_and_no_shared_random_bits(p):
    """Keep rate within 5 sigma; neighbouring columns, columns 8 apart and neighbouring rows agree at the rate of
    independent draws (one Philox call feeds eight columns: bits shared between two would agree always)."""
    keep = row_dropout_keep_mask((64, 1024), p, draw_dropout_seed())
    rate, n = keep.float().mean().item(), keep.numel()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    expected = (1 - p) ** 2 + p**2
    pairs = [(keep[:, i::8], keep[:, j::8]) for i in range(8) for j in range(i + 1, 8)]
    pairs += [(keep[:, :-8], keep[:, 8:]), (keep[:-1], keep[1:])]
    for first, second in pairs:
        agreement = (first == second).float().mean().item()
        assert abs(agreement - expected) < 5 * math.sqrt(expected * (1 - expected) / first.numel()), agreement


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_parameters(dtype):
    check_against_float64(*make_inputs((9, 100), dtype, with_residual=True, param_dtype=torch.float32))


def test_non_contiguous_inputs_and_gradient():
    n = 96
    x = (torch.randn(2, n, 10) + 1).transpose(1, 2)  # (2, 10, n), last dimension strided
    residual = torch.randn(2, 20, n)[:, ::2]  # rows strided
    weight = (1 + 0.2 * torch.randn(2 * n))[::2]
    bias = 0.2 * torch.randn(n)
    dy = torch.randn(n, 10, 2).permute(2, 1, 0)
    assert not any(t.is_contiguous() for t in (x, residual, weight, dy))
    check_against_float64(x, weight, bias, residual, dy=dy)


def test_broadcast_output_gradient():
    """`y.sum().backward()` hands the backward a stride-0 dy."""
    x, weight, bias, residual = make_inputs((5, 64), torch.float32, with_residual=True)
    check_against_float64(x, weight, bias, residual, dy=torch.ones(()).expand(5, 64))


def test_empty_batch():
    x, weight, bias, residual = (t.requires_grad_() for t in make_inputs((0, 64), torch.float16, True))
    y = layer_norm(x, weight, bias, residual=residual)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_and_bias_gradients_are_deterministic(dtype):
    """Bit-identical over two backward runs. The interpreter runs programs in order, so only a GPU can expose
    an order-dependent reduction (atomics) here; the kernel has none by construction."""
    x, weight, bias, residual = make_inputs((37, 384), dtype, with_residual=True)
    weight.requires_grad_()
    bias.requires_grad_()
    y = layer_norm(x, weight, bias, residual=residual)
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, [weight, bias], dy, retain_graph=True)
    second = torch.autograd.grad(y, [weight, bias], dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def count_kernel_launches(monkeypatch):
    """Wrap the forward and backward launchers; return the dict of call counts they update."""
    calls = {"forward": 0, "backward": 0}
    for direction in calls:
        launcher = getattr(layer_norm_module, f"layer_norm_{direction}")

        def counted(*args, _launcher=launcher, _direction=direction, **kwargs):
            calls[_direction] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(layer_norm_module, f"layer_norm_{direction}", counted)
    return calls


def test_interpreter_dispatches_to_triton(monkeypatch):
    monkeypatch.delenv("BERTFORGE_KERNELS", raising=False)
    calls = count_kernel_launches(monkeypatch)
    x, weight, bias, residual = make_inputs((4, 32), torch.float32, with_residual=True)
    layer_norm(x.requires_grad_(), weight, bias, residual=residual).sum().backward()
    assert calls == {"forward": 1, "backward": 1}


def test_reference_setting_bypasses_triton(monkeypatch):
    monkeypatch.setenv("BERTFORGE_KERNELS", "reference")
    calls = count_kernel_launches(monkeypatch)
    x, weight, bias, residual = make_inputs((4, MAX_N + 1), torch.float16, with_residual=True)
    y = layer_norm(x.requires_grad_(), weight, bias, residual=residual)
    y.sum().backward()
    assert calls == {"forward": 0, "backward": 0}
    assert torch.equal(y, reference.layer_norm(x, weight, bias, residual=residual))


def test_rows_too_long_for_triton_raise():
    x, weight, bias, _ = make_inputs((1, MAX_N + 1), torch.float32, with_residual=False)
    with pytest.raises(ValueError, match=f"up to {MAX_N}, got {MAX_N + 1}.*BERTFORGE_KERNELS=reference"):
        layer_norm(x, weight, bias)


@pytest.mark.parametrize("make_bad_call, error, message", [
    (lambda x, w, b, r: layer_norm(x, w[:-1], b, residual=r), ValueError, r"weight must have shape \(32,\)"),
    (lambda x, w, b, r: layer_norm(x, w, b.unsqueeze(0), residual=r), ValueError, r"bias must have shape \(32,\)"),
    (lambda x, w, b, r: layer_norm(x, w, b, residual=r[:-1]), ValueError, "residual must have x's shape"),
    (lambda x, w, b, r: layer_norm(x.long(), w, b), TypeError, "x must have dtype"),
    (lambda x, w, b, r: layer_norm(x.tolist(), w, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b, r: layer_norm(x, w, b, eps=0.0), ValueError, "eps must be positive"),
    (lambda x, w, b, r: layer_norm(x, w, b, residual=r, dropout_p=1.0), ValueError, r"dropout_p must be .* \[0, 1\)"),
], ids=["weight_shape", "bias_shape", "residual_shape", "int_x", "list_x", "eps", "dropout_p"])
def test_bad_input_raises_a_clear_error(make_bad_call, error, message):
    with pytest.raises(error, match=message):
        make_bad_call(*make_inputs((3, 32), torch.float32, with_residual=True))
