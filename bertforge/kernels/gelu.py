"""Fused bias-add + GELU: y = GELU(x + bias) (times a per-column scale, optionally: EarlyBERT's per-neuron slimming
coefficient), Triton forward and backward kernels under one autograd.Function.

The forward saves x and bias, not the pre-activation: the backward recomputes x + bias, one (rows, N) tensor less
held between forward and backward. All arithmetic runs in fp32 inside the kernels; only the stores cast back.
"""

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton
from ._triton import TRITON_DTYPE, CompileSpec, compile_spec, empty, programs_to_fill, prune_configs_for_host
from ._validate import check_bias_gelu_inputs

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_CUBIC = tl.constexpr(0.044715)
# Chebyshev fit of erfc (Numerical Recipes, 2nd ed., section 6.2): erfc(a) = t exp(-a^2 + P(t)), t = 1 / (1 + a/2),
# fractional error < 1.2e-7 for every a >= 0. Coefficients of P, constant term first.
_ERFC_P0 = tl.constexpr(-1.26551223)
_ERFC_P1 = tl.constexpr(1.00002368)
_ERFC_P2 = tl.constexpr(0.37409196)
_ERFC_P3 = tl.constexpr(0.09678418)
_ERFC_P4 = tl.constexpr(-0.18628806)
_ERFC_P5 = tl.constexpr(0.27886807)
_ERFC_P6 = tl.constexpr(-1.13520398)
_ERFC_P7 = tl.constexpr(1.48851587)
_ERFC_P8 = tl.constexpr(-0.82215223)
_ERFC_P9 = tl.constexpr(0.17087277)

# For A100 and H100 (chosen from the sm_80/sm_90 compile reports; no GPU timing yet). The op is memory-bound: every
# config gives each thread 16 elements (two 16-byte fp16 vectors per tensor), which keeps the backward near 64-106
# registers; 32 per thread took it to 165 and halved occupancy. The shapes trade bias reuse down the rows against
# column width; BERT's FFN widths (3072, 4096) are multiples of every BLOCK_N. num_stages=1: there is no tl.dot to
# pipeline. The interpreter runs only the first config, so it is one of the largest tiles.
_CONFIGS = [
    triton.Config({"BLOCK_ROWS": 4, "BLOCK_N": 1024}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_ROWS": 2, "BLOCK_N": 1024}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 8, "BLOCK_N": 256}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_ROWS": 16, "BLOCK_N": 256}, num_warps=8, num_stages=1),
]
# Every BLOCK_ROWS is a power of two, so this is a multiple of each: backward row strips sized in multiples of it
# split into whole tiles whatever config the autotuner picks.
_MAX_BLOCK_ROWS = max(config.kwargs["BLOCK_ROWS"] for config in _CONFIGS)

# Tune on the width only: the token count changes every step with unpadded (varlen) batches, and retuning on each
# new value would benchmark in the middle of training.
_AUTOTUNE = dict(configs=_CONFIGS, key=["N"], prune_configs_by={"early_config_prune": prune_configs_for_host})


@triton.jit
def _tanh_form_gate(z):
    """0.5 (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), written as sigmoid(2u) from e = exp(-2|u|) <= 1.

    Returns (gate, e). exp never sees a positive argument, so nothing overflows for large |z|.
    """
    u = _SQRT_2_OVER_PI * (z + _TANH_CUBIC * z * z * z)
    e = tl.exp(-2.0 * tl.abs(u))
    gate = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return gate, e


@triton.jit
def _normal_cdf(z):
    """Phi(z) = erfc(-z / sqrt 2) / 2 in fp32: relative error < 2e-6 for |z| < 4, < 2e-5 down to z = -13.

    0.5 (1 + erf(z / sqrt 2)), torch's fp32 formula, cancels in the left tail: off by 4% at z = -5, 0 below -5.5.
    """
    a = tl.abs(z) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * a)
    p = _ERFC_P8 + t * _ERFC_P9
    p = _ERFC_P7 + t * p
    p = _ERFC_P6 + t * p
    p = _ERFC_P5 + t * p
    p = _ERFC_P4 + t * p
    p = _ERFC_P3 + t * p
    p = _ERFC_P2 + t * p
    p = _ERFC_P1 + t * p
    p = _ERFC_P0 + t * p
    half_erfc = 0.5 * t * tl.exp(p - a * a)
    return tl.where(z < 0, half_erfc, 1.0 - half_erfc)


@triton.jit
def _gelu(z, APPROXIMATE_TANH: tl.constexpr):
    if APPROXIMATE_TANH:
        gate, _ = _tanh_form_gate(z)
    else:
        gate = _normal_cdf(z)
    return z * gate


@triton.jit
def _gelu_derivative(z, APPROXIMATE_TANH: tl.constexpr):
    if APPROXIMATE_TANH:
        # d/dz [z s] with s = sigmoid(2u): s + z * 2 s (1 - s) * du/dz, and s (1 - s) = e / (1 + e)^2.
        # Once e underflows to 0 the second term is 0; the guard keeps 0 * inf (z^2 overflowing) from making NaN.
        gate, e = _tanh_form_gate(z)
        du_dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * z * z)
        slope = 2.0 * z * du_dz * (e / ((1.0 + e) * (1.0 + e)))
        derivative = gate + tl.where(e > 0.0, slope, 0.0)
    else:
        # d/dz [z Phi(z)] = Phi(z) + z phi(z), Phi and phi the standard normal CDF and density.
        derivative = _normal_cdf(z) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return derivative


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _bias_gelu_forward_kernel(
    X, Bias, Scale, Y,  # X, Y: (n_rows, N) contiguous; Bias, Scale: (N,) (Scale read only when HAS_SCALE)
    n_rows, N,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, APPROXIMATE_TANH: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in_range = cols < N
    mask = (rows < n_rows)[:, None] & col_in_range[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]  # int64: rows * N can pass 2^31 on large batches

    bias = tl.load(Bias + cols, mask=col_in_range, other=0.0).to(tl.float32)
    z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
    y = _gelu(z, APPROXIMATE_TANH)
    if HAS_SCALE:
        y = y * tl.load(Scale + cols, mask=col_in_range, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _bias_gelu_backward_kernel(
    DY, X, Bias, Scale, DX,  # DY, X, DX: (n_rows, N) contiguous; Bias, Scale: (N,)
    DBiasPartial,  # (row programs, N) fp32: this program's column sums of dx over its rows
    DScalePartial,  # likewise for dscale = column sums of dy * GELU(z) (written only when HAS_SCALE)
    n_rows, N, rows_per_program,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, APPROXIMATE_TANH: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    row_program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in_range = cols < N
    bias = tl.load(Bias + cols, mask=col_in_range, other=0.0).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(Scale + cols, mask=col_in_range, other=0.0).to(tl.float32)
        dscale_tile = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)

    # Each program owns a strip of rows and sums dx over it in registers, in a fixed order: dbias is then one
    # deterministic sum over programs, with no atomics.
    dbias_tile = tl.zeros((BLOCK_ROWS, BLOCK_N), dtype=tl.float32)
    first_row = row_program * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    for row_start in range(first_row, end_row, BLOCK_ROWS):
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        mask = (rows < end_row)[:, None] & col_in_range[None, :]
        offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
        # Masked elements load dy = 0, so they add 0 to the sums.
        z = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:  # y = s * GELU(z): the scale's gradient needs GELU(z) itself, recomputed here
            dscale_tile += dy * _gelu(z, APPROXIMATE_TANH)
            dy = dy * scale[None, :]
        dx = dy * _gelu_derivative(z, APPROXIMATE_TANH)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dbias_tile += dx
    tl.store(DBiasPartial + row_program * N + cols, tl.sum(dbias_tile, axis=0), mask=col_in_range)
    if HAS_SCALE:
        tl.store(DScalePartial + row_program * N + cols, tl.sum(dscale_tile, axis=0), mask=col_in_range)


def bias_gelu_forward(x, bias, approximate, scale=None):
    """y = GELU(x + bias) (* scale) for contiguous x (rows, N), bias and scale (N,); y has x's dtype."""
    n_rows, n = x.shape
    y = empty((n_rows, n), x.dtype, x.device)
    if y.numel() == 0:
        return y
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_ROWS"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _bias_gelu_forward_kernel[grid](x, bias, bias if scale is None else scale, y, n_rows, n,
                                    APPROXIMATE_TANH=approximate == "tanh", HAS_SCALE=scale is not None)
    return y


def _backward_row_strips(n_rows, device):
    """(rows per backward program, number of row programs): a few strips per SM on a GPU, a handful otherwise."""
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs_to_fill(device)), _MAX_BLOCK_ROWS) * _MAX_BLOCK_ROWS
    return rows_per_program, triton.cdiv(n_rows, rows_per_program)


def bias_gelu_backward(dy, x, bias, approximate, scale=None):
    """(dx, dbias, dscale or None) for contiguous dy, x (rows, N), bias and scale (N,); dbias and dscale are summed
    in fp32, deterministically."""
    n_rows, n = x.shape
    dx = empty((n_rows, n), x.dtype, x.device)
    if dx.numel() == 0:
        return dx, torch.zeros_like(bias), None if scale is None else torch.zeros_like(scale)
    rows_per_program, row_programs = _backward_row_strips(n_rows, x.device)
    dbias_partial = empty((row_programs, n), torch.float32, x.device)
    dscale_partial = dbias_partial if scale is None else empty((row_programs, n), torch.float32, x.device)
    grid = lambda meta: (row_programs, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _bias_gelu_backward_kernel[grid](dy, x, bias, bias if scale is None else scale, dx, dbias_partial, dscale_partial,
                                     n_rows, n, rows_per_program, APPROXIMATE_TANH=approximate == "tanh",
                                     HAS_SCALE=scale is not None)
    dscale = None if scale is None else dscale_partial.sum(dim=0).to(scale.dtype)
    return dx, dbias_partial.sum(dim=0).to(bias.dtype), dscale


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, scale, approximate):
        x_2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()
        bias = bias.contiguous()
        scale = None if scale is None else scale.contiguous()
        y = bias_gelu_forward(x_2d, bias, approximate, scale)
        ctx.save_for_backward(x_2d, bias, scale)
        ctx.approximate = approximate
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x_2d, bias, scale = ctx.saved_tensors
        dx, dbias, dscale = bias_gelu_backward(dy.reshape(x_2d.shape).contiguous(), x_2d, bias, ctx.approximate,
                                               scale)
        return dx.view(dy.shape), dbias, dscale, None


def bias_gelu(x, bias, approximate="none", scale=None):
    """y = GELU(x + bias), times `scale` per column when given; x (..., N), bias and scale (N,), y in x's dtype.
    approximate: "none" (erf, BERT's) or "tanh"."""
    check_bias_gelu_inputs(x, bias, approximate, scale)
    if use_triton(x):
        return BiasGeluFunction.apply(x, bias, scale, approximate)
    return reference.bias_gelu(x, bias, approximate, scale)


def compile_specs() -> list[CompileSpec]:
    """Every (kernel, autotune config, dtype, GELU form) variant, for the offline sm_80 / sm_90 compile check."""
    specs = []
    for kernel in (_bias_gelu_forward_kernel, _bias_gelu_backward_kernel):
        for config in kernel.configs:
            for dtype in TRITON_DTYPE.values():
                # The slimming scale is an fp32 parameter, as the master weights are under autocast.
                types = {name: f"*{dtype}" for name in ("X", "Bias", "Y", "DY", "DX")} | {
                    "DBiasPartial": "*fp32", "DScalePartial": "*fp32", "Scale": "*fp32"}
                for approximate in ("none", "tanh"):
                    for has_scale in (False, True):
                        # Real calls pass the width N (the row stride; BERT's widths are multiples of 16) and
                        # rows_per_program (a multiple of _MAX_BLOCK_ROWS) as multiples of 16; n_rows is any count.
                        constants = {"APPROXIMATE_TANH": approximate == "tanh", "HAS_SCALE": has_scale}
                        specs.append(compile_spec(kernel, config, dtype, types, constants,
                                                  label=f"approximate={approximate} scale={has_scale}",
                                                  divisible_scalars=("N", "rows_per_program"),
                                                  elements_per_iteration=lambda c: c["BLOCK_ROWS"] * c["BLOCK_N"]))
    return specs
