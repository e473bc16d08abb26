"""Fused bias-add + GELU: the Triton kernels (run by the interpreter on CPU) against a float64 reference."""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bertforge.kernels import reference
from bertforge.kernels._triton import TRITON_DTYPE, poison_outputs
from conftest import assert_close_rel, relative_error

# The package re-exports bias_gelu; fetch the module itself for its launch helpers and compile specs.
gelu = importlib.import_module("bertforge.kernels.gelu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMS = ["none", "tanh"]
TRITON_GRAD_FN = "BiasGeluFunctionBackward"


def make_inputs(shape, dtype, bias_dtype=None):
    """Fresh random x spread over GELU's curved region (|z| up to ~6) and a bias of BERT-like size."""
    x = (2 * torch.randn(shape)).to(dtype)
    bias = (0.5 * torch.randn(shape[-1])).to(bias_dtype or dtype)
    return x, bias


def run_triton(x, bias, approximate, dy=None):
    """y, dx, dbias through the Triton path, every kernel output poisoned (NaN) before the kernels write it."""
    x, bias = x.detach().requires_grad_(), bias.detach().requires_grad_()
    with poison_outputs():
        y = gelu.bias_gelu(x, bias, approximate)
        assert type(y.grad_fn).__name__ == TRITON_GRAD_FN, "the call did not go through the Triton kernels"
        dy = torch.randn_like(y) if dy is None else dy
        dx, dbias = torch.autograd.grad(y, (x, bias), dy)
    return y, dx, dbias, dy


def check_against_float64(x, bias, approximate):
    """Forward and both gradients vs autograd of the float64 reference on the same rounded inputs."""
    y, dx, dbias, dy = run_triton(x, bias, approximate)
    x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    y64 = reference.bias_gelu(x64, bias64, approximate)
    dx64, dbias64 = torch.autograd.grad(y64, (x64, bias64), dy.double())

    assert (y.dtype, dx.dtype, dbias.dtype) == (x.dtype, x.dtype, bias.dtype)
    assert dx.shape == x.shape and dbias.shape == bias.shape
    for what, actual, expected in (("y", y, y64), ("dx", dx, dx64), ("dbias", dbias, dbias64)):
        assert_close_rel(actual.detach(), expected.detach(), x.dtype, what)
    return (y, dx, dbias), (y64, dx64, dbias64)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: TRITON_DTYPE[d])
@pytest.mark.parametrize("n", [16, 100, 768, 3072])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_matches_float64_reference(rows, n, dtype, approximate):
    check_against_float64(*make_inputs((rows, n), dtype), approximate)


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: TRITON_DTYPE[d])
@pytest.mark.parametrize("rows, n", [(1, 100), (130, 768)])
def test_the_per_neuron_scale_matches_float64_reference(rows, n, dtype, approximate):
    """y = s * GELU(x + bias) with an fp32 scale (EarlyBERT's slimming coefficient): y, dx, dbias and dscale."""
    x, bias = make_inputs((rows, n), dtype)
    scale = torch.empty(n).uniform_(-1.5, 1.5)
    inputs = [t.detach().requires_grad_() for t in (x, bias, scale)]
    with poison_outputs():
        y = gelu.bias_gelu(inputs[0], inputs[1], approximate, scale=inputs[2])
        assert type(y.grad_fn).__name__ == TRITON_GRAD_FN
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, inputs, dy)
    exact = [t.detach().double().requires_grad_() for t in (x, bias, scale)]
    y64 = reference.bias_gelu(exact[0], exact[1], approximate, scale=exact[2])
    grads64 = torch.autograd.grad(y64, exact, dy.double())
    assert grads[2].dtype == torch.float32 and grads[2].shape == (n,)
    for what, actual, expected in zip(("y", "dx", "dbias", "dscale"), (y, *grads), (y64, *grads64)):
        assert_close_rel(actual.detach(), expected.detach(), x.dtype, what)


def test_a_scale_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"scale must have shape \(16,\)"):
        gelu.bias_gelu(torch.randn(4, 16), torch.randn(16), "none", scale=torch.ones(15))


@settings(max_examples=10, deadline=None)
@given(
    leading=st.lists(st.integers(1, 12), min_size=0, max_size=2),
    n=st.integers(1, 3100),
    dtype=st.sampled_from(DTYPES),
    approximate=st.sampled_from(FORMS),
)
def test_fuzzed_shapes_match_float64_reference(leading, n, dtype, approximate):
    # A few elements could all land deep in GELU's left tail, where fp16 outputs are subnormal and their rounding
    # alone exceeds the tolerance; 16 elements (the smallest case of the matrix above) make that vanishingly rare.
    assume(math.prod(leading) * n >= 16)
    check_against_float64(*make_inputs((*leading, n), dtype), approximate)


@pytest.mark.parametrize("approximate", FORMS)
def test_each_form_matches_its_own_formula(approximate):
    # The erf and tanh forms differ by a relative error norm of ~2e-4, under the shared fp32 tolerance (set for
    # tf32 dots): pin the form with fp32 elementwise accuracy (~1e-7) instead.
    results, expected = check_against_float64(*make_inputs((130, 768), torch.float32), approximate)
    for what, actual, exact in zip(("y", "dx", "dbias"), results, expected):
        assert relative_error(actual.detach(), exact.detach()) < 1e-5, what


def test_dbias_spans_several_backward_programs():
    # Rows 130 (in the matrix above) must split into several strips, or the partial-sum reduction goes untested.
    _, row_programs = gelu._backward_row_strips(130, torch.device("cpu"))
    assert row_programs > 1


def test_dbias_backward_gives_every_sm_a_strip_on_a_gpu(monkeypatch):
    # No GPU here: H100-like device properties stand in, so the CUDA branch of the split runs.
    sms = 132
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=sms))
    n_rows = 32 * 512  # a BERT batch of tokens
    rows_per_program, row_programs = gelu._backward_row_strips(n_rows, torch.device("cuda"))
    assert row_programs >= sms
    assert rows_per_program % gelu._MAX_BLOCK_ROWS == 0  # whole tiles whatever config the autotuner picks
    assert (row_programs - 1) * rows_per_program < n_rows <= row_programs * rows_per_program  # no empty strip


NON_CONTIGUOUS_X = {
    "transposed": lambda: (2 * torch.randn(96, 3, 64)).half().transpose(0, 2),  # (64, 3, 96)
    "every-other-column": lambda: (2 * torch.randn(37, 192)).half()[:, ::2],  # (37, 96)
    "every-other-row": lambda: (2 * torch.randn(74, 96)).half()[::2],  # (37, 96)
}


@pytest.mark.parametrize("approximate", FORMS)
@pytest.mark.parametrize("layout", NON_CONTIGUOUS_X)
def test_non_contiguous_inputs(layout, approximate):
    x = NON_CONTIGUOUS_X[layout]()
    bias = (0.5 * torch.randn(192)).half()[::2]  # (96,), stride 2
    assert not x.is_contiguous() and not bias.is_contiguous()
    check_against_float64(x, bias, approximate)


def test_bias_in_float32_with_half_activations():
    check_against_float64(*make_inputs((33, 200), torch.bfloat16, bias_dtype=torch.float32), "none")


@pytest.mark.parametrize("approximate", FORMS)
def test_dbias_is_deterministic(approximate):
    x, bias = make_inputs((200, 800), torch.float16)
    dy = torch.randn(200, 800).half()
    first, second = (run_triton(x, bias, approximate, dy)[2] for _ in range(2))
    assert torch.equal(first, second)


def gelu_without_cancellation(z, approximate):
    """GELU in float64 written so the left tail does not cancel (the reference's 1 + erf / 1 + tanh does)."""
    if approximate == "tanh":
        return z * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))  # 0.5 (1 + tanh u) = sigmoid(2u)
    return z * 0.5 * torch.special.erfc(-z / math.sqrt(2))


@pytest.mark.parametrize("approximate", FORMS)
def test_left_tail_keeps_relative_accuracy(approximate):
    # Outputs from 1e-4 down to 1e-12, which bf16 and fp32 represent; torch's fp32 GELU is 4% off at z = -5 and
    # returns 0 below -5.5.
    x = -torch.linspace(4, 6.5, 64).reshape(1, 64)
    y, dx, _, dy = run_triton(x, torch.zeros(64), approximate)
    x64 = x.double().requires_grad_()
    y64 = gelu_without_cancellation(x64, approximate)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert ((y - y64) / y64).abs().max() < 1e-4
    assert ((dx - dx64) / dx64).abs().max() < 1e-4


# The interpreter evaluates both sides of tl.where in numpy, which warns about the overflow the guard discards.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("approximate", FORMS)
def test_extreme_inputs_give_the_limits(approximate):
    # Far from 0, GELU(z) -> max(z, 0) and GELU'(z) -> step(z); exp and z^3 overflowing must not make NaN.
    x = torch.tensor([[-1e20, -1e13, -1e4, -40.0, 40.0, 1e4, 1e13, 1e20]])
    y, dx, dbias, _ = run_triton(x, torch.zeros(8), approximate, dy=torch.ones_like(x))
    assert torch.equal(y, x.clamp_min(0))
    assert torch.equal(dx, (x > 0).float())
    assert torch.equal(dbias, (x[0] > 0).float())


@pytest.mark.parametrize("with_scale", [False, True])
def test_saves_inputs_not_the_pre_activation(with_scale):
    x, bias = make_inputs((4, 64), torch.float32)
    scale = torch.rand(64).requires_grad_() if with_scale else None
    y = gelu.bias_gelu(x.requires_grad_(), bias.requires_grad_(), scale=scale)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    inputs = [x, bias] + ([scale] if with_scale else [])
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in inputs]


def test_empty_input():
    x, bias = make_inputs((0, 3, 16), torch.float32)
    y, dx, dbias, _ = run_triton(x, bias, "none")
    assert y.shape == dx.shape == (0, 3, 16)
    assert torch.equal(dbias, torch.zeros(16))


def test_reference_when_forced(monkeypatch):
    monkeypatch.setenv("BERTFORGE_KERNELS", "reference")
    x, bias = make_inputs((3, 16), torch.float32)
    y = gelu.bias_gelu(x.requires_grad_(), bias)
    assert type(y.grad_fn).__name__ != TRITON_GRAD_FN
    torch.testing.assert_close(y, reference.bias_gelu(x, bias), rtol=0, atol=0)


@pytest.mark.parametrize("choice", ["auto", "triton"])
def test_triton_under_the_interpreter(monkeypatch, choice):
    monkeypatch.setenv("BERTFORGE_KERNELS", choice)
    x, bias = make_inputs((3, 16), torch.float32)
    assert type(gelu.bias_gelu(x.requires_grad_(), bias).grad_fn).__name__ == TRITON_GRAD_FN


@pytest.mark.parametrize("force", ["triton", "reference"])
@pytest.mark.parametrize(
    "x, bias, approximate, error, message",
    [
        (torch.randn(4, 16), torch.randn(15), "none", ValueError, r"bias must have shape \(16,\)"),
        (torch.randn(4, 16), torch.randn(4, 16), "none", ValueError, r"bias must have shape \(16,\)"),
        (torch.randn(4, 16).double(), torch.randn(16), "none", TypeError, "x must have dtype"),
        (torch.randn(4, 16), torch.arange(16), "none", TypeError, "bias must have dtype"),
        (torch.randn(4, 16), torch.randn(16), "fast", ValueError, "approximate must be 'none'"),
    ],
    ids=["bias-too-short", "bias-not-1d", "x-float64", "bias-int", "approximate-fast"],
)
def test_bad_input_raises_a_clear_error(monkeypatch, force, x, bias, approximate, error, message):
    monkeypatch.setenv("BERTFORGE_KERNELS", force)
    with pytest.raises(error, match=message):
        gelu.bias_gelu(x, bias, approximate)
