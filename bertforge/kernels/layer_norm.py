"""Fused residual-add + LayerNorm: y = LayerNorm(x + residual) over the last dimension, in Triton.

The forward keeps one row in registers per program and saves the fp32 mean and 1/std. The backward recomputes
x + residual and the normalised row from them instead of storing it, and reduces dweight/dbias without atomics:
each program sums its chunk of rows into its own fp32 row of a partial buffer, then one `sum(0)` adds the rows,
so the result is the same bit for bit on every run.
"""

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton
from ._triton import TRITON_DTYPE, CompileSpec, compile_spec, empty, programs_to_fill, prune_configs_for_host
from ._validate import check_layer_norm_inputs

MAX_N = 8192  # one row must fit in a program's registers; at 8192 the shipped configs still do not spill

# For A100 / H100, chosen from the compiled resource usage (not yet timed on the GPUs). A row lives in registers,
# so the warps set how many elements each thread holds. The backward keeps five row-sized fp32 vectors live and
# spills at BLOCK_N 8192 with 4 warps (255 registers + 672 B of stack on sm_80), so it starts at 8 warps.
# num_stages=1: the forward has no loop, and pipelining the backward's row loop would only add register pressure.
FORWARD_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=1),
    triton.Config({}, num_warps=8, num_stages=1),
    triton.Config({}, num_warps=16, num_stages=1),
]
BACKWARD_CONFIGS = [
    triton.Config({}, num_warps=8, num_stages=1),
    triton.Config({}, num_warps=16, num_stages=1),
]


@triton.autotune(configs=FORWARD_CONFIGS, key=["N"], prune_configs_by={"early_config_prune": prune_configs_for_host})
@triton.jit
def _layer_norm_forward_kernel(
    X, Residual, Weight, Bias, Y, Mean, Rstd,  # X, Residual, Y: (rows, N) contiguous; Mean, Rstd: (rows,) fp32
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    row_offset = row.to(tl.int64) * N  # rows * N can pass 2**31
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N

    h = tl.load(X + row_offset + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(Residual + row_offset + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(h, axis=0) / N
    centered = tl.where(in_row, h - mean, 0.0)  # the padding columns must not count in the variance
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)

    weight = tl.load(Weight + cols, mask=in_row, other=0.0).to(tl.float32)
    bias = tl.load(Bias + cols, mask=in_row, other=0.0).to(tl.float32)
    y = centered * rstd * weight + bias
    tl.store(Y + row_offset + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.autotune(configs=BACKWARD_CONFIGS, key=["N"], prune_configs_by={"early_config_prune": prune_configs_for_host})
@triton.jit
def _layer_norm_backward_kernel(
    DY, X, Residual, Weight, Mean, Rstd,  # DY, X, Residual: (rows, N) contiguous
    DX, DWeightPartial, DBiasPartial,  # DX: (rows, N); the partials: (programs, N) fp32, one row per program
    n_rows, rows_per_program, N,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    weight = tl.load(Weight + cols, mask=in_row, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)

    first_row = program * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    row_offset = first_row.to(tl.int64) * N
    for row in range(first_row, last_row):
        h = tl.load(X + row_offset + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h += tl.load(Residual + row_offset + cols, mask=in_row, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        # x_hat is not 0 in the padding columns, but dy and weight load as 0 there, so it adds nothing to the sums.
        x_hat = (h - tl.load(Mean + row)) * rstd
        dy = tl.load(DY + row_offset + cols, mask=in_row, other=0.0).to(tl.float32)

        # dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with g = weight * dy, the gradient wrt x_hat.
        g = weight * dy
        mean_g = tl.sum(g, axis=0) / N
        mean_g_x_hat = tl.sum(g * x_hat, axis=0) / N
        dx = (g - mean_g - x_hat * mean_g_x_hat) * rstd
        tl.store(DX + row_offset + cols, dx.to(DX.dtype.element_ty), mask=in_row)

        dweight += dy * x_hat
        dbias += dy
        row_offset += N

    partial_offset = program.to(tl.int64) * N
    tl.store(DWeightPartial + partial_offset + cols, dweight, mask=in_row)
    tl.store(DBiasPartial + partial_offset + cols, dbias, mask=in_row)


def _block_n(n):
    if n > MAX_N:
        raise ValueError(
            f"layer_norm's Triton kernel supports a last dimension up to {MAX_N}, got {n}; "
            "set BERTFORGE_KERNELS=reference to use the plain-PyTorch version")
    return triton.next_power_of_2(n)


def layer_norm_forward(x, weight, bias, eps, residual=None):
    """Launch the forward on x (rows, N) contiguous; return y (rows, N) in x's dtype and fp32 mean, rstd (rows,)."""
    n_rows, n = x.shape
    block_n = _block_n(n)
    y = empty((n_rows, n), x.dtype, x.device)
    mean = empty((n_rows,), torch.float32, x.device)
    rstd = empty((n_rows,), torch.float32, x.device)
    _layer_norm_forward_kernel[(n_rows,)](
        x, residual, weight, bias, y, mean, rstd, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n)
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, residual=None):
    """Launch the backward on (rows, N) contiguous tensors; return dx in x's dtype and fp32 dweight, dbias (N,)."""
    n_rows, n = x.shape
    block_n = _block_n(n)
    rows_per_program = max(1, triton.cdiv(n_rows, programs_to_fill(x.device)))
    programs = max(1, triton.cdiv(n_rows, rows_per_program))  # no idle program; one writes zeros if rows == 0
    dx = empty((n_rows, n), x.dtype, x.device)
    dweight_partial = empty((programs, n), torch.float32, x.device)
    dbias_partial = empty((programs, n), torch.float32, x.device)
    _layer_norm_backward_kernel[(programs,)](
        dy, x, residual, weight, mean, rstd, dx, dweight_partial, dbias_partial,
        n_rows, rows_per_program, n,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n)
    return dx, dweight_partial.sum(0), dbias_partial.sum(0)


class LayerNormFunction(torch.autograd.Function):
    """Autograd over the Triton kernels: x, residual (..., N) are flattened to contiguous (rows, N)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        n = x.shape[-1]
        x_rows = x.reshape(-1, n).contiguous()
        residual_rows = residual.reshape(-1, n).contiguous() if residual is not None else None
        weight, bias = weight.contiguous(), bias.contiguous()
        y, mean, rstd = layer_norm_forward(x_rows, weight, bias, eps, residual_rows)
        ctx.save_for_backward(x_rows, residual_rows, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rows, residual_rows, weight, mean, rstd = ctx.saved_tensors
        dy_rows = dy.reshape(x_rows.shape).contiguous()  # dy may be a broadcast view with stride 0
        dx, dweight, dbias = layer_norm_backward(dy_rows, x_rows, weight, mean, rstd, residual_rows)
        dx = dx.view(dy.shape)
        # d(x + residual)/dx = d(x + residual)/dresidual = identity: both get the same gradient.
        return (dx, dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None,
                dx if residual_rows is not None else None)


def layer_norm(x, weight, bias, eps=1e-12, residual=None):
    """y = LayerNorm(x + residual) over the last dimension; x (..., N), weight and bias (N,), y in x's dtype."""
    check_layer_norm_inputs(x, weight, bias, eps, residual)
    if use_triton(x):
        return LayerNormFunction.apply(x, weight, bias, eps, residual)
    return reference.layer_norm(x, weight, bias, eps, residual)


def compile_specs() -> list[CompileSpec]:
    """Every kernel x autotune config x dtype, at BLOCK_N 8192 (the worst case) and 1024, with a residual."""
    kernels = (  # kernel, configs, pointers to data in the spec's dtype, pointers to fp32 buffers
        (_layer_norm_forward_kernel, FORWARD_CONFIGS, ("X", "Residual", "Weight", "Bias", "Y"), ("Mean", "Rstd")),
        (_layer_norm_backward_kernel, BACKWARD_CONFIGS, ("DY", "X", "Residual", "Weight", "DX"),
         ("Mean", "Rstd", "DWeightPartial", "DBiasPartial")),
    )
    specs = []
    for dtype in TRITON_DTYPE.values():
        for kernel, configs, data_pointers, fp32_pointers in kernels:
            types = {name: f"*{dtype}" for name in data_pointers} | {name: "*fp32" for name in fp32_pointers}
            for block_n in (MAX_N, 1024):
                for config in configs:
                    specs.append(compile_spec(kernel, config, dtype, types | {"eps": "fp32"},
                                              {"HAS_RESIDUAL": True, "BLOCK_N": block_n}, label=f"BLOCK_N={block_n}",
                                              divisible_scalars=("N",)))  # N = BLOCK_N here, a multiple of 16
    return specs
