"""The attention kernels' dropout keep-mask, materialised for tests (the kernels regenerate it, never store it)."""

import torch
import triton
import triton.language as tl

from bertforge.kernels.attention import _dropout_keep


@triton.jit
def _dropout_mask_kernel(Keep, seed, max_seqlen, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, pid_bh, rows, cols, max_seqlen, dropout_p)
    ptrs = Keep + pid_bh.to(tl.int64) * max_seqlen * max_seqlen + rows[:, None] * max_seqlen + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < max_seqlen)[:, None] & (cols < max_seqlen)[None, :])


def dropout_keep_mask(batch, heads, max_seqlen, dropout_p, seed, device):
    """The bool keep-mask (batch, heads, max_seqlen, max_seqlen) that `attention` uses for this seed.

    Row i, column j of a packed (varlen) sequence sit at [b, h, i, j], as in the padded layout."""
    keep = torch.empty((batch * heads, max_seqlen, max_seqlen), dtype=torch.int8, device=device)
    grid = (triton.cdiv(max_seqlen, 64), triton.cdiv(max_seqlen, 64), batch * heads)
    _dropout_mask_kernel[grid](keep, seed, max_seqlen, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return keep.bool().view(batch, heads, max_seqlen, max_seqlen)
