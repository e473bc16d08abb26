"""Linear + cross-entropy in one op: loss and gradients against PyTorch's own F.linear + F.cross_entropy in
float64, across chunk boundaries, with an incoming gradient, under autocast, with no rows and without autograd."""

import pytest
import torch
import torch.nn.functional as F

from bertforge.kernels import linear_cross_entropy
from conftest import TOLERANCE, assert_close_rel, relative_error


def make_inputs(rows, hidden, vocab, dtype=torch.float32):
    x = torch.randn(rows, hidden, dtype=dtype)
    weight = (torch.randn(vocab, hidden) / hidden ** 0.5).to(dtype)
    bias = torch.randn(vocab).to(dtype)
    targets = torch.randint(vocab, (rows,))
    return x, weight, bias, targets


def gradients(loss_fn, x, weight, bias, targets, grad_loss):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    loss = loss_fn(*leaves, targets)
    return (loss.detach(), *torch.autograd.grad(loss, leaves, grad_loss))


def peer(x, weight, bias, targets):
    return F.cross_entropy(F.linear(x, weight, bias), targets)


# chunk_rows: one row per chunk, a last chunk of one row (rows = 2 * 4 + 1), a chunk larger than every row, the
# default (one chunk at these sizes).
@pytest.mark.parametrize("chunk_rows", [1, 4, 64, None])
def test_loss_and_gradients_match_pytorch_in_float64(chunk_rows):
    x, weight, bias, targets = make_inputs(9, 16, 37, torch.float64)
    grad_loss = torch.rand((), dtype=torch.float64) + 0.5  # a scaled loss, as under gradient accumulation

    got = gradients(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), x, weight, bias, targets, grad_loss)
    expected = gradients(peer, x, weight, bias, targets, grad_loss)
    for name, g, e in zip(["loss", "x", "weight", "bias"], got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12), f"{name}: max error {(g - e).abs().max():.3e}"


def test_float32_with_large_logits_matches_float64():
    """Logits far from 0 (the max-shift must keep exp finite), a vocabulary of odd size, several chunks."""
    x, weight, bias, targets = make_inputs(33, 24, 101)
    x = 30 * x
    got = gradients(lambda *a: linear_cross_entropy(*a, chunk_rows=8), x, weight, bias, targets, torch.tensor(1.0))
    expected = gradients(peer, x.double(), weight.double(), bias.double(), targets, torch.tensor(1.0).double())
    for name, g, e in zip(["loss", "x", "weight", "bias"], got, expected):
        assert g.dtype == torch.float32, name
        assert_close_rel(g.reshape(-1), e.reshape(-1), torch.float32, name)


def test_the_default_chunks_cover_every_row():
    """At the default chunking a real MLM-head shape spans several chunks (2**21 logits each)."""
    x, weight, bias, targets = make_inputs(200, 8, 30522)
    assert 2 ** 21 // 30522 < 200  # more than one chunk
    got = gradients(linear_cross_entropy, x, weight, bias, targets, torch.tensor(1.0))
    expected = gradients(peer, x.double(), weight.double(), bias.double(), targets, torch.tensor(1.0).double())
    for name, g, e in zip(["loss", "x", "weight", "bias"], got, expected):
        assert_close_rel(g.reshape(-1), e.reshape(-1), torch.float32, name)


def test_bfloat16_autocast_keeps_fp32_loss_and_input_dtypes():
    x, weight, bias, targets = make_inputs(21, 32, 53)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gradients(lambda *a: linear_cross_entropy(*a, chunk_rows=8), x, weight, bias, targets,
                        torch.tensor(1.0))
    expected = gradients(peer, x.double(), weight.double(), bias.double(), targets, torch.tensor(1.0).double())
    assert [g.dtype for g in got] == [torch.float32] * 4  # the loss in fp32, gradients in their inputs' dtypes
    for name, g, e in zip(["loss", "x", "weight", "bias"], got, expected):
        assert_close_rel(g.reshape(-1), e.reshape(-1), torch.bfloat16, name)


def test_no_rows_gives_zero_loss_and_zero_gradients():
    x, weight, bias, targets = make_inputs(0, 8, 11)
    loss, gx, gw, gb = gradients(linear_cross_entropy, x, weight, bias, targets, torch.tensor(1.0))
    assert loss.item() == 0 and gx.shape == (0, 8)
    assert not gw.any() and not gb.any()


def test_without_autograd_the_loss_is_the_same():
    x, weight, bias, targets = make_inputs(30, 16, 40)
    with torch.no_grad():
        evaluated = linear_cross_entropy(x, weight, bias, targets, chunk_rows=7)
    trained = linear_cross_entropy(x, weight.detach().requires_grad_(), bias, targets, chunk_rows=7)
    assert evaluated.requires_grad is False and trained.requires_grad is True
    assert torch.equal(evaluated, trained.detach())
    expected = peer(x.double(), weight.double(), bias.double(), targets)
    assert relative_error(evaluated, expected) <= TOLERANCE[torch.float32]


def test_bad_shapes_are_refused():
    x, weight, bias, targets = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(x, weight[:, :7], bias, targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, weight, bias, targets[:3])


def test_a_second_backward_through_the_same_graph_raises_instead_of_scaling_twice():
    x, weight, bias, targets = (t.requires_grad_() if t.is_floating_point() else t for t in make_inputs(6, 4, 9))
    loss = linear_cross_entropy(x, weight, bias, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.slow
def test_under_torch_compile_a_new_row_count_does_not_compile_again():
    def loss_fn(x, weight, bias, targets):
        return 2 * linear_cross_entropy(x, weight, bias, targets)

    compiled = torch.compile(loss_fn)
    _, weight, bias, _ = make_inputs(1, 8, 50)
    for rows in (3, 4):  # the second size makes torch.compile's shapes dynamic
        compiled(*make_inputs(rows, 8, 50)[:1], weight, bias, torch.randint(50, (rows,)))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in range(5, 12):
            x, targets = torch.randn(rows, 8), torch.randint(50, (rows,))
            assert torch.allclose(compiled(x, weight, bias, targets), loss_fn(x, weight, bias, targets))
