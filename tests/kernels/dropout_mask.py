"""The kernels' dropout keep-masks (attention, layer norm), materialised for tests: the kernels regenerate them,
never store them."""

import torch
import triton
import triton.language as tl

from bertforge.kernels.attention import _dropout_keep
from bertforge.kernels.dropout import quantised_probability
from bertforge.kernels.layer_norm import _row_dropout_keep


@triton.jit
def _dropout_mask_kernel(Keep, seed, max_seqlen, dropout_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, rows, pid_n * BLOCK_N, max_seqlen, dropout_threshold, BLOCK_N)
    ptrs = Keep + pid_bh.to(tl.int64) * max_seqlen * max_seqlen + rows[:, None] * max_seqlen + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < max_seqlen)[:, None] & (cols < max_seqlen)[None, :])


def dropout_keep_mask(batch, heads, max_seqlen, dropout_p, seed, device, block_m=64, block_n=64):
    """The bool keep-mask (batch, heads, max_seqlen, max_seqlen) that `attention` uses for this seed, drawn in
    tiles of block_m x block_n.

    Row i, column j of a packed (varlen) sequence sit at [b, h, i, j], as in the padded layout."""
    keep = torch.empty((batch * heads, max_seqlen, max_seqlen), dtype=torch.int8, device=device)
    grid = (triton.cdiv(max_seqlen, block_m), triton.cdiv(max_seqlen, block_n), batch * heads)
    threshold, _ = quantised_probability(dropout_p)
    _dropout_mask_kernel[grid](keep, seed, max_seqlen, threshold, BLOCK_M=block_m, BLOCK_N=block_n)
    return keep.bool().view(batch, heads, max_seqlen, max_seqlen)


@triton.jit
def _row_dropout_mask_kernel(Keep, seed, n, dropout_threshold, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    keep = _row_dropout_keep(seed, row, dropout_threshold, BLOCK_N)
    tl.store(Keep + row.to(tl.int64) * n + cols, keep.to(tl.int8), mask=cols < n)


def row_dropout_keep_mask(shape, dropout_p, seed):
    """The bool keep-mask `layer_norm` applies to an x of `shape` for this seed (rows of the last dimension)."""
    n = shape[-1]
    keep = torch.empty(shape, dtype=torch.int8).view(-1, n)
    threshold, _ = quantised_probability(dropout_p)
    _row_dropout_mask_kernel[(keep.shape[0],)](keep, seed, n, threshold, BLOCK_N=triton.next_power_of_2(n))
    return keep.bool().view(shape)
