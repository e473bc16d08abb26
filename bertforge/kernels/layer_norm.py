"""Fused dropout + residual-add + LayerNorm: y = LayerNorm(dropout(x) + residual) over the last dimension, in Triton.

The post-LN block of a transformer in one pass: x is the sublayer's output in its own dtype (bf16 under autocast),
the residual the stream in its own (fp32), y comes in the residual's dtype. The forward keeps one row in
registers per program and saves the fp32 mean and 1/std; the dropout mask is never stored: the backward
regenerates it from the seed, recomputes dropout(x) + residual and the normalised row, and writes the gradients
of x (dropped, in x's dtype) and of the residual in the same pass. dweight/dbias are reduced without atomics:
each program sums its chunk of rows into its own fp32 row of a partial buffer, then one `sum(0)` adds the rows,
so the result is the same bit for bit on every run.
"""

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton
from ._philox import DRAWN_PER_CALL, KernelDropout, eight_uniforms
from ._triton import TRITON_DTYPE, CompileSpec, compile_spec, empty, programs_to_fill, prune_configs_for_host
from ._validate import check_layer_norm_inputs
from .dropout import draw_dropout_seed

# One row must fit in a program's registers. At 8192 the backward of a half-precision x on an fp32 stream (which
# writes dx and dresidual apart) spilled with 8 and 16 warps; at 4096 (BERT-large's hidden size is 1024) no variant
# of the shipped configs spills.
MAX_N = 4096

# For A100 / H100, chosen from the compiled resource usage (not yet timed on the GPUs). A row lives in registers,
# so the warps set how many elements each thread holds. The backward keeps five row-sized fp32 vectors live: it
# spilled at BLOCK_N 8192 with 4 warps (255 registers + 672 B of stack on sm_80), and with dropout at 4096 with 8
# (8 B on sm_90), so it runs with 16.
# num_stages=1: the forward has no loop, and pipelining the backward's row loop would only add register pressure.
FORWARD_CONFIGS = [
    triton.Config({}, num_warps=4, num_stages=1),
    triton.Config({}, num_warps=8, num_stages=1),
    triton.Config({}, num_warps=16, num_stages=1),
]
BACKWARD_CONFIGS = [
    triton.Config({}, num_warps=16, num_stages=1),
]


@triton.jit
def _row_dropout_keep(seed, row, dropout_threshold, BLOCK_N: tl.constexpr):
    """Keep-mask of one row: column 8 g + k takes uniform k of the Philox call numbered row * BLOCK_N / 8 + g."""
    row64 = tl.zeros([BLOCK_N // 8], tl.int64) + row  # row * BLOCK_N / 8 can pass 2**31; row may be a Python int
    counters = row64 * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    return tl.reshape(eight_uniforms(seed, counters), (BLOCK_N,)) >= dropout_threshold.to(tl.uint32)


@triton.autotune(configs=FORWARD_CONFIGS, key=["N"], prune_configs_by={"early_config_prune": prune_configs_for_host})
@triton.jit(do_not_specialize=DRAWN_PER_CALL)
def _layer_norm_forward_kernel(
    X, Residual, Weight, Bias, Y, Mean, Rstd,  # X, Residual, Y: (rows, N) contiguous; Mean, Rstd: (rows,) fp32
    N, eps, seed, dropout_threshold, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    row_offset = row.to(tl.int64) * N  # rows * N can pass 2**31
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N

    h = tl.load(X + row_offset + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        h = tl.where(_row_dropout_keep(seed, row, dropout_threshold, BLOCK_N), h * dropout_scale, 0.0)
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
@triton.jit(do_not_specialize=DRAWN_PER_CALL)
def _layer_norm_backward_kernel(
    DY, X, Residual, Weight, Mean, Rstd,  # DY, X, Residual: (rows, N) contiguous
    DX, DResidual,  # (rows, N) in x's and the residual's dtype; DResidual written only when WRITE_DRESIDUAL
    DWeightPartial, DBiasPartial,  # (programs, N) fp32, one row per program
    n_rows, rows_per_program, N, seed, dropout_threshold, dropout_scale,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
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
        if HAS_DROPOUT:
            keep = _row_dropout_keep(seed, row, dropout_threshold, BLOCK_N)
            h = tl.where(keep, h * dropout_scale, 0.0)
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
        dh = (g - mean_g - x_hat * mean_g_x_hat) * rstd  # the gradient of dropout(x) + residual
        if WRITE_DRESIDUAL:
            tl.store(DResidual + row_offset + cols, dh.to(DResidual.dtype.element_ty), mask=in_row)
        dx = tl.where(keep, dh * dropout_scale, 0.0) if HAS_DROPOUT else dh
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


_NO_DROPOUT = KernelDropout(0.0, 0)  # placeholder arguments when HAS_DROPOUT is off


def layer_norm_forward(x, weight, bias, eps, residual=None, dropout=None):
    """Launch the forward on x (rows, N) contiguous; return y (rows, N) in the residual's dtype (x's without one)
    and fp32 mean, rstd (rows,). dropout: a KernelDropout applied to x, or None."""
    n_rows, n = x.shape
    block_n = _block_n(n)
    y = empty((n_rows, n), (residual if residual is not None else x).dtype, x.device)
    mean = empty((n_rows,), torch.float32, x.device)
    rstd = empty((n_rows,), torch.float32, x.device)
    _layer_norm_forward_kernel[(n_rows,)](
        x, residual, weight, bias, y, mean, rstd, n, eps,
        **(dropout or _NO_DROPOUT).kernel_args(),
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout is not None, BLOCK_N=block_n)
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, mean, rstd, residual=None, dropout=None):
    """Launch the backward on (rows, N) contiguous tensors; return dx in x's dtype, dresidual in the residual's
    (dx itself when the two are the same: no dropout, one dtype; None without a residual) and fp32 dweight,
    dbias (N,)."""
    n_rows, n = x.shape
    block_n = _block_n(n)
    rows_per_program = max(1, triton.cdiv(n_rows, programs_to_fill(x.device)))
    programs = max(1, triton.cdiv(n_rows, rows_per_program))  # no idle program; one writes zeros if rows == 0
    write_dresidual = residual is not None and (dropout is not None or residual.dtype != x.dtype)
    dx = empty((n_rows, n), x.dtype, x.device)
    dresidual = empty((n_rows, n), residual.dtype, x.device) if write_dresidual else None
    dweight_partial = empty((programs, n), torch.float32, x.device)
    dbias_partial = empty((programs, n), torch.float32, x.device)
    _layer_norm_backward_kernel[(programs,)](
        dy, x, residual, weight, mean, rstd, dx, dresidual, dweight_partial, dbias_partial,
        n_rows, rows_per_program, n, **(dropout or _NO_DROPOUT).kernel_args(),
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout is not None, WRITE_DRESIDUAL=write_dresidual,
        BLOCK_N=block_n)
    if residual is not None and not write_dresidual:
        dresidual = dx  # d(x + residual)/dx = d(x + residual)/dresidual = identity
    return dx, dresidual, dweight_partial.sum(0), dbias_partial.sum(0)


class LayerNormFunction(torch.autograd.Function):
    """Autograd over the Triton kernels: x, residual (..., N) are flattened to contiguous (rows, N)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual, dropout):
        n = x.shape[-1]
        x_rows = x.reshape(-1, n).contiguous()
        residual_rows = residual.reshape(-1, n).contiguous() if residual is not None else None
        weight, bias = weight.contiguous(), bias.contiguous()
        y, mean, rstd = layer_norm_forward(x_rows, weight, bias, eps, residual_rows, dropout)
        ctx.save_for_backward(x_rows, residual_rows, weight, mean, rstd)
        ctx.bias_dtype, ctx.dropout = bias.dtype, dropout
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rows, residual_rows, weight, mean, rstd = ctx.saved_tensors
        dy_rows = dy.reshape(x_rows.shape).contiguous()  # dy may be a broadcast view with stride 0
        dx, dresidual, dweight, dbias = layer_norm_backward(dy_rows, x_rows, weight, mean, rstd, residual_rows,
                                                            ctx.dropout)
        return (dx.view(dy.shape), dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None,
                dresidual.view(dy.shape) if dresidual is not None else None, None)


def layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0):
    """y = LayerNorm(dropout(x) + residual) over the last dimension; x (..., N), weight and bias (N,).

    residual: x's shape, any float dtype (the fp32 stream beside a bf16 sublayer output); y comes in its dtype, or
    in x's without one. dropout_p: drop probability for x (pass 0 in evaluation), on the 2^-16 grid of `dropout`.
    """
    check_layer_norm_inputs(x, weight, bias, eps, residual, dropout_p)
    if use_triton(x):
        dropout = KernelDropout(dropout_p, draw_dropout_seed()) if dropout_p > 0.0 else None
        return LayerNormFunction.apply(x, weight, bias, eps, residual, dropout)
    return reference.layer_norm(x, weight, bias, eps, residual, dropout_p)


# (x, the residual stream and y, weight and bias) dtypes a call can bring: one dtype throughout, or under autocast a
# half-precision sublayer output with fp32 parameters (and an fp32 stream when there is a residual).
_DTYPE_SETS = {True: [(d, d, d) for d in TRITON_DTYPE.values()] + [(h, "fp32", "fp32") for h in ("fp16", "bf16")],
               False: [(d, d, d) for d in TRITON_DTYPE.values()] + [(h, h, "fp32") for h in ("fp16", "bf16")]}


def compile_specs() -> list[CompileSpec]:
    """Every kernel x autotune config x dtype set, with and without a residual and dropout, at BLOCK_N MAX_N (the
    worst case) and 1024."""
    specs = []
    for has_residual, dtype_sets in _DTYPE_SETS.items():
        for x_dtype, stream_dtype, param_dtype in dtype_sets:
            types = {"X": f"*{x_dtype}", "DX": f"*{x_dtype}", "Weight": f"*{param_dtype}", "Bias": f"*{param_dtype}",
                     "eps": "fp32", "dropout_scale": "fp32"}
            types |= {name: f"*{stream_dtype}" for name in ("Residual", "Y", "DY", "DResidual")}
            types |= {name: "*fp32" for name in ("Mean", "Rstd", "DWeightPartial", "DBiasPartial")}
            for has_dropout in (False, True):
                flags = dict(HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout)
                label = [f"x={x_dtype}" if x_dtype != stream_dtype else "", "residual" if has_residual else "",
                         "dropout" if has_dropout else "",
                         f"params={param_dtype}" if param_dtype != stream_dtype else ""]
                write_dresidual = has_residual and (has_dropout or x_dtype != stream_dtype)
                for kernel, configs, extra in ((_layer_norm_forward_kernel, FORWARD_CONFIGS, {}),
                                               (_layer_norm_backward_kernel, BACKWARD_CONFIGS,
                                                {"WRITE_DRESIDUAL": write_dresidual})):
                    for block_n in (MAX_N, 1024):
                        for config in configs:
                            specs.append(compile_spec(
                                kernel, config, stream_dtype, types, flags | extra | {"BLOCK_N": block_n},
                                label=",".join(filter(None, [f"BLOCK_N={block_n}", *label])),
                                divisible_scalars=("N",),  # N = BLOCK_N here, a multiple of 16
                                elements_per_iteration=lambda c: c["BLOCK_N"]))  # a row
    return specs
