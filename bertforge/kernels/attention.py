"""Bidirectional FlashAttention-2 in Triton: padded (key_padding_mask) and packed (cu_seqlens) layouts, dropout.

Forward: one program per (query block, batch*head) streams key blocks with an online softmax and stores the
base-2 logsumexp. Backward recomputes P from it: one program per key block accumulates dK, dV over all query
blocks, a second kernel accumulates dQ per query block. No atomics, so the backward is deterministic.

Both layouts share the kernels: a sequence is (start row, length). Padded: start 0, length = seq, keys masked
by key_padding_mask. Packed: start = cu_seqlens[b], length = cu_seqlens[b+1] - start, batch stride 0.
A query with no real key (an all-padding sequence) gets zeros and zero gradients.
"""

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton
from ._philox import DRAWN_PER_CALL, KernelDropout, eight_uniforms
from ._triton import TRITON_DTYPE, CompileSpec, compile_spec, config_label, empty, interpreting
from ._validate import check_attention_inputs
from .dropout import draw_dropout_seed

LOG2E = 1.4426950408889634


def _configs(*rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in rows]


def _by_head_dim(lists):
    """Lists keyed (element bytes, head_dim class); head_dim 16..32 runs the 32 list, 48..64 the 64 list, 80..128
    the 128 list, and a class-32 list not given is the class-64 one."""
    return {**{(size, 32): configs for (size, block), configs in lists.items() if block == 64}, **lists}


def _head_dim_class(block_d: int) -> int:
    return 32 if block_d <= 32 else 64 if block_d <= 64 else 128


# Autotune candidates per GPU generation (80: A100 and every arch but Hopper; 90: H100), keyed by (element bytes,
# head_dim class): 2 = fp16/bf16, 4 = fp32 (tf32 dots); see _by_head_dim.
# Every entry passes the offline compile check (python -m bertforge.kernels.compile_check) in every variant it can
# run in on its arch: each dtype and head_dim block of its list, packed or padded, with or without a mask and
# dropout: no register spill, shared memory within the limit. Tiles that spilled in any one variant were dropped,
# e.g. on sm_80 the forward's 64x64 with 4 warps, 128x32, 32x32 with 4 warps in fp32 and, at head_dim 128, 128x64,
# dK/dV 64x64 (4 or 8 warps) at head_dim 64 (kept at 16..32), the forward's 128x128 at head_dim 16 and 32 (ptxas
# then holds it to 128 registers) and dQ's 128x128. BLOCK_N is a multiple of 32 (dropout).
# On sm_90 wgmma needs 64 rows per warpgroup in every dot (a 32-row dot falls back to mma.sync), so its tiles have
# BLOCK_M >= 64 and, in dK/dV, whose dots run with BLOCK_N rows too, BLOCK_N >= 64; except dK/dV at head_dim 128
# and in fp32, where every 64x64 tile spilled (4, 8 or 16 warps: dK, dV, K and V all live in registers) and the
# sm_80 lists stay.
FWD_CONFIGS = {
    80: _by_head_dim({
        (2, 32): _configs((128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)),
        (2, 64): _configs((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2)),
        (2, 128): _configs((64, 32, 4, 4), (32, 32, 4, 2)),
        (4, 64): _configs((32, 32, 2, 2), (32, 32, 4, 1)),
        (4, 128): _configs((32, 32, 4, 2), (32, 64, 8, 2))}),
    90: _by_head_dim({
        (2, 64): _configs((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
        (2, 128): _configs((64, 32, 4, 4)),
        (4, 64): _configs((64, 64, 4, 2), (64, 32, 4, 2)),
        (4, 128): _configs((64, 32, 4, 2), (64, 32, 8, 2))}),
}
DKDV_CONFIGS = {  # BLOCK_N keys held in registers, BLOCK_M queries streamed
    80: _by_head_dim({
        (2, 32): _configs((64, 32, 8, 2), (64, 64, 4, 1), (64, 64, 4, 2), (32, 32, 4, 3)),
        (2, 64): _configs((64, 32, 8, 2), (64, 32, 4, 1), (32, 32, 4, 3)),
        (2, 128): _configs((32, 64, 8, 2), (32, 32, 4, 2)),
        (4, 64): _configs((32, 32, 2, 2)),
        (4, 128): _configs((32, 32, 4, 2), (32, 64, 8, 2))}),
    90: _by_head_dim({
        (2, 64): _configs((64, 64, 4, 1), (64, 64, 4, 2), (64, 64, 8, 1)),
        (2, 128): _configs((32, 64, 8, 2), (32, 32, 4, 2)),  # mma.sync
        (4, 64): _configs((32, 32, 2, 2)),  # mma.sync
        (4, 128): _configs((32, 32, 4, 2), (32, 64, 8, 2))}),  # mma.sync
}
DQ_CONFIGS = {  # BLOCK_M queries held, BLOCK_N keys streamed
    80: _by_head_dim({
        (2, 64): _configs((64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 3), (32, 32, 4, 2)),
        (2, 128): _configs((32, 64, 4, 2), (32, 32, 8, 2)),
        (4, 64): _configs((32, 32, 4, 2), (64, 32, 4, 2)),
        (4, 128): _configs((32, 32, 4, 2))}),
    90: _by_head_dim({
        (2, 64): _configs((64, 64, 4, 2), (64, 64, 8, 3), (128, 128, 8, 2)),
        (2, 128): _configs((64, 64, 4, 2), (64, 32, 4, 2)),
        (4, 64): _configs((64, 32, 4, 2), (64, 64, 4, 2)),
        (4, 128): _configs((64, 32, 4, 2), (64, 32, 8, 2))}),
}
ARCHS = {80: range(80, 90), 90: range(90, 100)}  # compute capabilities (10 major + minor) each table is for
DELTA_CONFIG = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)  # elementwise + row sums: no loop


def config_table(arch: int) -> int:
    """The key of the config tables for a compute capability (10 major + minor): 90 on Hopper, 80 elsewhere."""
    return 90 if arch in ARCHS[90] else 80


def shipped_configs(table, block_d, elem_bytes, arch=80):
    """The configs a kernel may run with on this arch for this head_dim block and element size (2: fp16/bf16,
    4: fp32)."""
    return table[config_table(arch)][(elem_bytes, _head_dim_class(block_d))]


def _device_arch(tensor) -> int:
    if tensor.device.type != "cuda":
        return 80  # the interpreter runs the sm_80 lists
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


def _pruner(table):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = shipped_configs(table, args["BLOCK_D"], args["Q"].element_size(), _device_arch(args["Q"]))
        return kept[:1] if interpreting() else kept  # the interpreter cannot benchmark: first survivor

    return prune


def _autotune(table):
    every = {config_label(c): c for per_arch in table.values() for configs in per_arch.values() for c in configs}
    return triton.autotune(configs=list(every.values()),
                           key=["SEQLEN_BUCKET", "BLOCK_D", "IS_VARLEN", "HAS_MASK", "HAS_DROPOUT"],
                           prune_configs_by={"early_config_prune": _pruner(table)})


@triton.jit
def _dropout_keep(seed, pid_bh, rows, col_start, max_seqlen, dropout_threshold, BLOCK_N: tl.constexpr):
    """Keep-mask of the (rows x BLOCK_N) tile starting at column col_start (a multiple of 32), Philox keyed by
    (seed, batch*head); see `_philox` for the uniforms and the threshold.

    Column col = 32 b + 8 j + 2 c + e takes uniform (word j, half e) of the call at counter row * max_seqlen +
    4 b + c: a thread of the tensor-core accumulator layout owns columns 2c, 2c+1 of every 8, so each call's eight
    uniforms land in one thread and the mask is built in registers, with no layout conversion. The mapping
    depends on the absolute column only, so every kernel and tile size regenerates the forward's mask.
    """
    tl.static_assert(BLOCK_N % 32 == 0, "the dropout mask is drawn in 32-column blocks")
    BLOCK_M: tl.constexpr = rows.shape[0]
    rng_seed = seed.to(tl.int64) + (pid_bh.to(tl.int64) << 32)
    counters = rows[:, None] * max_seqlen + (col_start // 8 + tl.arange(0, BLOCK_N // 8))[None, :]  # (row, 4 b + c)
    uniforms = tl.reshape(eight_uniforms(rng_seed, counters), (BLOCK_M, BLOCK_N // 32, 4, 4, 2))  # [row, b, c, j, e]
    uniforms = tl.reshape(tl.permute(uniforms, (0, 1, 3, 2, 4)), (BLOCK_M, BLOCK_N))
    return uniforms >= dropout_threshold.to(tl.uint32)


@triton.jit
def _sequence_bounds(CuSeqlens, b, seqlen_padded, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        start = tl.load(CuSeqlens + b)
        return start, tl.load(CuSeqlens + b + 1) - start
    return 0, seqlen_padded


@triton.jit
def _load_rows(base, token_rows, row_ok, stride_row, offs_d, d_ok, DOT_IN_FP32: tl.constexpr):
    """A (rows x BLOCK_D) tile of q, k, v or dO; zeros outside the sequence and past head_dim."""
    tile = tl.load(base + token_rows[:, None].to(tl.int64) * stride_row + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_IN_FP32:  # only under the interpreter, whose bf16 dot is wrong; GPUs keep the native dot
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _recompute_p_dp(q, k, v, do, lse, key_real, rows, col_start, scale_log2, dropout_threshold, dropout_scale,
                    seed, pid_bh, max_seqlen, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward's view of one (query block x key block) tile: P recomputed from the logsumexp, P after
    dropout (what multiplied V), and dP after dropout. The caller forms dS = P * (dP - delta) after its dV
    update: computing it earlier keeps more tiles alive and spilled registers on sm_90."""
    p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None])
    p = tl.where(key_real[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, pid_bh, rows, col_start, max_seqlen, dropout_threshold, BLOCK_N)
        p_dropped = tl.where(keep, p * dropout_scale, 0.0)
        dp = tl.where(keep, dp * dropout_scale, 0.0)
    else:
        p_dropped = p
    return p, p_dropped, dp


@triton.jit
def _key_is_real(KeyMask, b, stride_maskb, cols, seqlen, HAS_MASK: tl.constexpr):
    real = cols < seqlen
    if HAS_MASK:
        real = real & (tl.load(KeyMask + b * stride_maskb + cols, mask=real, other=0) != 0)
    return real


@triton.jit
def _fwd_tile(acc, m_i, l_i, start_n, q, k_base, v_base, start, seqlen, offs_n, offs_d, d_ok, stride_kn, stride_vn,
              KeyMask, b, stride_maskb, scale_log2, seed, pid_bh, rows, max_seqlen, dropout_threshold,
              MASK_KEYS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """One key tile of the forward's online softmax: the updated (acc, running max, denominator). The max runs on
    the unscaled dot (the scale is positive), so the exponent is one FFMA per score, as in the Triton tutorial;
    MASK_KEYS is off for a whole tile without a key padding mask, which then loads and scores unmasked."""
    cols = start_n + offs_n
    if MASK_KEYS:
        col_in = cols < seqlen
        k = _load_rows(k_base, start + cols, col_in, stride_kn, offs_d, d_ok, DOT_IN_FP32)
        v = _load_rows(v_base, start + cols, col_in, stride_vn, offs_d, d_ok, DOT_IN_FP32)
        key_real = _key_is_real(KeyMask, b, stride_maskb, cols, seqlen, HAS_MASK)
        qk = tl.where(key_real[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
    else:
        k = _load_rows(k_base, start + cols, cols >= 0, stride_kn, offs_d, d_ok, DOT_IN_FP32)
        v = _load_rows(v_base, start + cols, cols >= 0, stride_vn, offs_d, d_ok, DOT_IN_FP32)
        qk = tl.dot(q, tl.trans(k))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    if MASK_KEYS:  # while a row has seen no real key its max is -inf: subtract 0 instead, so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # a whole tile of real keys: the max is finite
        m_safe = m_new
    p = tl.exp2(qk * scale_log2 - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
    if HAS_DROPOUT:
        p = tl.where(_dropout_keep(seed, pid_bh, rows, start_n, max_seqlen, dropout_threshold, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@_autotune(FWD_CONFIGS)
@triton.jit(do_not_specialize=DRAWN_PER_CALL)
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, KeyMask, CuSeqlens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_maskb,
    num_heads, seqlen_padded, max_seqlen, head_dim, scale_log2, dropout_threshold, dropout_scale, seed,
    SEQLEN_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, seqlen = _sequence_bounds(CuSeqlens, b, seqlen_padded, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    d_ok = offs_d < head_dim
    b64 = b.to(tl.int64)
    k_base = K + b64 * stride_kb + h * stride_kh
    v_base = V + b64 * stride_vb + h * stride_vh
    q = _load_rows(Q + b64 * stride_qb + h * stride_qh, start + rows, row_ok, stride_qm, offs_d, d_ok, DOT_IN_FP32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Every key tile but the last partial one is whole and needs no mask; under a key padding mask, every tile does.
    # At head_dim 128 and in fp32 the second copy of the tile's code spilled registers: there every tile masks.
    if HAS_MASK or BLOCK_D > 64 or Q.dtype.element_ty == tl.float32:
        for start_n in range(0, seqlen, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, start_n, q, k_base, v_base, start, seqlen, offs_n, offs_d, d_ok,
                                      stride_kn, stride_vn, KeyMask, b, stride_maskb, scale_log2, seed, pid_bh, rows,
                                      max_seqlen, dropout_threshold, True, HAS_MASK, HAS_DROPOUT, DOT_IN_FP32, BLOCK_N)
    else:
        whole_end = seqlen // BLOCK_N * BLOCK_N
        for start_n in range(0, whole_end, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, start_n, q, k_base, v_base, start, seqlen, offs_n, offs_d, d_ok,
                                      stride_kn, stride_vn, KeyMask, b, stride_maskb, scale_log2, seed, pid_bh, rows,
                                      max_seqlen, dropout_threshold, False, HAS_MASK, HAS_DROPOUT, DOT_IN_FP32, BLOCK_N)
        if whole_end < seqlen:  # the partial tile, outside the loop: the loop's body stays the unmasked one
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, whole_end, q, k_base, v_base, start, seqlen, offs_n, offs_d, d_ok,
                                      stride_kn, stride_vn, KeyMask, b, stride_maskb, scale_log2, seed, pid_bh, rows,
                                      max_seqlen, dropout_threshold, True, HAS_MASK, HAS_DROPOUT, DOT_IN_FP32, BLOCK_N)

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale
    o_ptrs = Out + b64 * stride_ob + h * stride_oh + (start + rows)[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # Base-2 logsumexp of the scaled scores; +inf for a row with no real key makes its recomputed P zero.
    lse = tl.where(empty_row, float("inf"), m_i + tl.log2(tl.where(empty_row, 1.0, l_i)))
    tl.store(Lse + pid_bh.to(tl.int64) * max_seqlen + rows, lse, mask=row_ok)


@triton.jit
def _attention_bwd_delta_kernel(
    Out, DOut, Delta, CuSeqlens,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    num_heads, seqlen_padded, max_seqlen, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(dO * O), the softmax-backward correction term, in the (batch*heads, max_seqlen) layout."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, seqlen = _sequence_bounds(CuSeqlens, b, seqlen_padded, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < seqlen)[:, None] & (offs_d < head_dim)[None, :]
    row64 = (start + rows)[:, None].to(tl.int64)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h * stride_oh + row64 * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b.to(tl.int64) * stride_dob + h * stride_doh + row64 * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * max_seqlen + rows, tl.sum(o * do, 1), mask=rows < seqlen)


@_autotune(DKDV_CONFIGS)
@triton.jit(do_not_specialize=DRAWN_PER_CALL)
def _attention_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, KeyMask, CuSeqlens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_gb, stride_gh, stride_gm, stride_maskb,
    num_heads, seqlen_padded, max_seqlen, head_dim, softmax_scale, scale_log2, dropout_threshold, dropout_scale, seed,
    SEQLEN_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV of one key block: stream every query block, recompute P from the logsumexp."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, seqlen = _sequence_bounds(CuSeqlens, b, seqlen_padded, IS_VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = cols < seqlen
    d_ok = offs_d < head_dim
    b64 = b.to(tl.int64)
    k = _load_rows(K + b64 * stride_kb + h * stride_kh, start + cols, col_in, stride_kn, offs_d, d_ok, DOT_IN_FP32)
    v = _load_rows(V + b64 * stride_vb + h * stride_vh, start + cols, col_in, stride_vn, offs_d, d_ok, DOT_IN_FP32)
    key_real = _key_is_real(KeyMask, b, stride_maskb, cols, seqlen, HAS_MASK)
    q_base = Q + b64 * stride_qb + h * stride_qh
    do_base = DOut + b64 * stride_dob + h * stride_doh
    stats_base = pid_bh.to(tl.int64) * max_seqlen

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < seqlen
        q = _load_rows(q_base, start + rows, row_ok, stride_qm, offs_d, d_ok, DOT_IN_FP32)
        do = _load_rows(do_base, start + rows, row_ok, stride_dom, offs_d, d_ok, DOT_IN_FP32)
        lse = tl.load(Lse + stats_base + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + stats_base + rows, mask=row_ok, other=0.0)
        p, p_dropped, dp = _recompute_p_dp(q, k, v, do, lse, key_real, rows, pid_n * BLOCK_N, scale_log2,
                                           dropout_threshold, dropout_scale, seed, pid_bh, max_seqlen, HAS_DROPOUT,
                                           BLOCK_N)
        dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do)
        ds = p * (dp - delta[:, None])  # gradient of the scaled scores
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)

    dk *= softmax_scale
    out_mask = col_in[:, None] & d_ok[None, :]
    g_offsets = b64 * stride_gb + h * stride_gh + (start + cols)[:, None].to(tl.int64) * stride_gm + offs_d[None, :]
    tl.store(DK + g_offsets, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + g_offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@_autotune(DQ_CONFIGS)
@triton.jit(do_not_specialize=DRAWN_PER_CALL)
def _attention_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KeyMask, CuSeqlens,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_gb, stride_gh, stride_gm, stride_maskb,
    num_heads, seqlen_padded, max_seqlen, head_dim, softmax_scale, scale_log2, dropout_threshold, dropout_scale, seed,
    SEQLEN_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block: stream every key block, recompute P from the logsumexp."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start, seqlen = _sequence_bounds(CuSeqlens, b, seqlen_padded, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    d_ok = offs_d < head_dim
    b64 = b.to(tl.int64)
    q = _load_rows(Q + b64 * stride_qb + h * stride_qh, start + rows, row_ok, stride_qm, offs_d, d_ok, DOT_IN_FP32)
    do = _load_rows(DOut + b64 * stride_dob + h * stride_doh, start + rows, row_ok, stride_dom, offs_d, d_ok,
                    DOT_IN_FP32)
    stats_base = pid_bh.to(tl.int64) * max_seqlen
    lse = tl.load(Lse + stats_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + stats_base + rows, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + h * stride_kh
    v_base = V + b64 * stride_vb + h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + offs_n
        col_in = cols < seqlen
        k = _load_rows(k_base, start + cols, col_in, stride_kn, offs_d, d_ok, DOT_IN_FP32)
        v = _load_rows(v_base, start + cols, col_in, stride_vn, offs_d, d_ok, DOT_IN_FP32)
        key_real = _key_is_real(KeyMask, b, stride_maskb, cols, seqlen, HAS_MASK)
        p, _, dp = _recompute_p_dp(q, k, v, do, lse, key_real, rows, start_n, scale_log2, dropout_threshold,
                                   dropout_scale, seed, pid_bh, max_seqlen, HAS_DROPOUT, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq *= softmax_scale
    q_rows = (start + rows)[:, None].to(tl.int64)
    tl.store(DQ + b64 * stride_gb + h * stride_gh + q_rows * stride_gm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _dot_in_fp32(dtype):
    return interpreting() and dtype == torch.bfloat16


class AttentionProblem:
    """One attention call as the kernels see it (layout, sizes, dropout, scale, pointer arguments), computed once
    and shared by forward and backward."""

    def __init__(self, q, key_padding_mask, cu_seqlens, is_varlen, batch, heads, max_seqlen, head_dim,
                 dropout_p, softmax_scale, seed):
        self.is_varlen, self.batch, self.heads, self.head_dim = is_varlen, batch, heads, head_dim
        self.max_seqlen = max_seqlen
        self.seqlen_padded = 0 if is_varlen else q.shape[2]
        self.dropout_p, self.seed = dropout_p, seed
        self.dropout = KernelDropout(dropout_p, seed)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.key_mask = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None
        # An absent mask or cu_seqlens still needs a valid pointer argument; the constexpr flags skip its loads.
        needs_placeholder = key_padding_mask is None or cu_seqlens is None
        placeholder = torch.empty(1, dtype=torch.int32, device=q.device) if needs_placeholder else None
        self.key_mask_arg = self.key_mask if self.key_mask is not None else placeholder
        self.cu_seqlens_arg = cu_seqlens if cu_seqlens is not None else placeholder

    def kernel_args(self):
        return dict(
            KeyMask=self.key_mask_arg, CuSeqlens=self.cu_seqlens_arg,
            stride_maskb=self.key_mask.stride(0) if self.key_mask is not None else 0,
            num_heads=self.heads, seqlen_padded=self.seqlen_padded, max_seqlen=self.max_seqlen,
            head_dim=self.head_dim, **self.dropout.kernel_args(),
            SEQLEN_BUCKET=triton.next_power_of_2(max(self.max_seqlen, 1)),
            IS_VARLEN=self.is_varlen, HAS_MASK=self.key_mask is not None, HAS_DROPOUT=self.dropout_p > 0.0,
            BLOCK_D=_block_d(self.head_dim),
        )

    def strides(self, t):
        """(batch, head, row) strides of a padded (B, H, S, D) or packed (T, H, D) tensor; the last dim is unit."""
        return (0, t.stride(1), t.stride(0)) if self.is_varlen else (t.stride(0), t.stride(1), t.stride(2))


def _launch(kernel, grid, config, **args):
    """Run an autotuned kernel, or one explicit config (tests use this to cover every shipped config)."""
    if config is None:
        kernel[grid](**args)
    else:
        kernel.fn[grid](**args, **config.all_kwargs())


def attention_forward(q, k, v, problem, config=None, out=None):
    """Returns (out, lse): out like q (or the given `out`, any strides but a unit last one); lse
    (batch*heads, max_seqlen) float32, base-2 logsumexp of scaled scores."""
    out = empty(q.shape, q.dtype, q.device) if out is None else out
    lse = empty((problem.batch * problem.heads, problem.max_seqlen), torch.float32, q.device)
    qs, ks, vs, os_ = (problem.strides(t) for t in (q, k, v, out))
    grid = lambda meta: (triton.cdiv(problem.max_seqlen, meta["BLOCK_M"]), problem.batch * problem.heads)  # noqa: E731
    _launch(_attention_fwd_kernel, grid, config, Q=q, K=k, V=v, Out=out, Lse=lse,
            stride_qb=qs[0], stride_qh=qs[1], stride_qm=qs[2], stride_kb=ks[0], stride_kh=ks[1], stride_kn=ks[2],
            stride_vb=vs[0], stride_vh=vs[1], stride_vn=vs[2], stride_ob=os_[0], stride_oh=os_[1], stride_om=os_[2],
            scale_log2=problem.softmax_scale * LOG2E, DOT_IN_FP32=_dot_in_fp32(q.dtype), **problem.kernel_args())
    return out, lse


def attention_backward(do, q, k, v, out, lse, problem, dkdv_config=None, dq_config=None, grads=None):
    """Returns (dq, dk, dv), deterministic: no atomics. `grads`: the three tensors to write them into, sharing one
    set of strides (views of one packed dqkv buffer), else new contiguous ones."""
    args = problem.kernel_args()
    os_, dos = problem.strides(out), problem.strides(do)
    delta = empty(lse.shape, torch.float32, q.device)
    delta_grid = (triton.cdiv(problem.max_seqlen, DELTA_CONFIG.kwargs["BLOCK_M"]), problem.batch * problem.heads)
    _attention_bwd_delta_kernel[delta_grid](
        out, do, delta, args["CuSeqlens"], os_[0], os_[1], os_[2], dos[0], dos[1], dos[2],
        problem.heads, problem.seqlen_padded, problem.max_seqlen, problem.head_dim,
        IS_VARLEN=problem.is_varlen, BLOCK_D=args["BLOCK_D"], **DELTA_CONFIG.all_kwargs())

    dq, dk, dv = grads if grads is not None else (empty(q.shape, q.dtype, q.device) for _ in range(3))
    if len({t.stride() for t in (dq, dk, dv)}) != 1:
        raise ValueError("dq, dk and dv must share strides: the kernels take one set")
    qs, ks, vs, gs = (problem.strides(t) for t in (q, k, v, dq))
    shared = dict(Q=q, K=k, V=v, DOut=do, Lse=lse, Delta=delta,
                  stride_qb=qs[0], stride_qh=qs[1], stride_qm=qs[2], stride_kb=ks[0], stride_kh=ks[1],
                  stride_kn=ks[2], stride_vb=vs[0], stride_vh=vs[1], stride_vn=vs[2],
                  stride_dob=dos[0], stride_doh=dos[1], stride_dom=dos[2],
                  stride_gb=gs[0], stride_gh=gs[1], stride_gm=gs[2],
                  softmax_scale=problem.softmax_scale, scale_log2=problem.softmax_scale * LOG2E,
                  DOT_IN_FP32=_dot_in_fp32(q.dtype), **args)
    bh = problem.batch * problem.heads
    _launch(_attention_bwd_dkdv_kernel, lambda meta: (triton.cdiv(problem.max_seqlen, meta["BLOCK_N"]), bh),
            dkdv_config, DK=dk, DV=dv, **shared)
    _launch(_attention_bwd_dq_kernel, lambda meta: (triton.cdiv(problem.max_seqlen, meta["BLOCK_M"]), bh),
            dq_config, DQ=dq, **shared)
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem):
        out, lse = attention_forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(_unit_last_stride(do), q, k, v, out, lse, ctx.problem)
        return dq, dk, dv, None


class QKVPackedAttentionFunction(torch.autograd.Function):
    """Attention on one fused projection: the backward writes dq, dk, dv into a single dqkv buffer, so autograd
    does not stack three gradients into a new tensor (3 x tokens x hidden elements copied per layer)."""

    @staticmethod
    def forward(ctx, qkv, problem):
        out = empty(qkv.shape[:-3] + qkv.shape[-2:], qkv.dtype, qkv.device)  # (tokens | batch, seq), heads, d
        _, lse = attention_forward(*_qkv_views(qkv, problem.is_varlen), problem, out=_out_view(out, problem))
        ctx.save_for_backward(qkv, out, lse)
        ctx.problem = problem
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse = ctx.saved_tensors
        problem = ctx.problem
        dqkv = empty(qkv.shape, qkv.dtype, qkv.device)
        attention_backward(_out_view(_unit_last_stride(dout), problem), *_qkv_views(qkv, problem.is_varlen),
                           _out_view(out, problem), lse, problem, grads=_qkv_views(dqkv, problem.is_varlen))
        return dqkv, None


def _qkv_views(qkv, is_varlen):
    """q, k, v views of a packed (tokens, 3, heads, d) or padded (batch, seq, 3, heads, d) tensor, in the layout
    the kernels read: (tokens, heads, d) or (batch, heads, seq, d)."""
    q, k, v = qkv.unbind(-3)
    return (q, k, v) if is_varlen else (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def _out_view(out, problem):
    """The (batch, seq, heads, d) output of the padded layout as the (batch, heads, seq, d) view the kernels use."""
    return out if problem.is_varlen else out.transpose(1, 2)


def attention(q, k, v, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
              softmax_scale=None):
    """Bidirectional softmax(q k^T * scale) v with padding masks or packed sequences; differentiable.

    Padded: q, k, v (batch, heads, seq, head_dim), key_padding_mask (batch, seq) bool, True = real token.
    Packed: q, k, v (total_tokens, heads, head_dim), cu_seqlens (batch+1,) int32 offsets (FlashAttention varlen),
    max_seqlen >= the longest sequence: on a GPU it must be given and is trusted, as cu_seqlens is checked only on
    the CPU or with BERTFORGE_DEBUG=1 (reading a device tensor's values waits for the GPU).
    head_dim in 16..128 (multiple of 16); fp16, bf16 or fp32 (tf32 dots on GPU). Dropout seeds come from torch's RNG.
    """
    is_varlen, batch, heads, max_len, head_dim = check_attention_inputs(
        q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    if not use_triton(q):
        return reference.attention(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale)
    if q.numel() == 0:
        return q.clone()
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    problem = AttentionProblem(q, key_padding_mask, cu_seqlens, is_varlen, batch, heads, max_len, head_dim,
                               dropout_p, softmax_scale, seed)
    # Views of a fused QKV projection need no copy: the kernels take any strides but a unit last one.
    return AttentionFunction.apply(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v), problem)


# The layouts a call can launch (flags IS_VARLEN, HAS_MASK): packed (what BertModel trains with), padded with a
# key_padding_mask, padded without one.
LAYOUTS = {"varlen": (True, False), "masked": (False, True), "dense": (False, False)}
BLOCK_DS = (16, 32, 64, 128)  # every block _block_d picks for head_dim 16..128


def attention_qkvpacked(qkv, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
                        softmax_scale=None):
    """`attention` on a fused QKV projection, with one gradient buffer for it.

    Packed: qkv (total_tokens, 3, heads, head_dim) with cu_seqlens -> (total_tokens, heads, head_dim).
    Padded: qkv (batch, seq, 3, heads, head_dim), key_padding_mask optional -> (batch, seq, heads, head_dim),
    written in that order (no transpose copy before the output projection). Arguments otherwise as `attention`.
    """
    packed = cu_seqlens is not None
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != (4 if packed else 5) or qkv.shape[-3] != 3:
        shape = "(total_tokens, 3, heads, head_dim)" if packed else "(batch, seq, 3, heads, head_dim)"
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must have shape {shape}, got {got}")
    q, k, v = _qkv_views(qkv, packed)
    is_varlen, batch, heads, max_len, head_dim = check_attention_inputs(
        q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    if not use_triton(qkv):
        out = reference.attention(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale)
        return out if packed else out.transpose(1, 2)
    if qkv.numel() == 0:
        return qkv.new_empty(qkv.shape[:-3] + qkv.shape[-2:])
    seed = draw_dropout_seed() if dropout_p > 0.0 else 0
    problem = AttentionProblem(q, key_padding_mask, cu_seqlens, is_varlen, batch, heads, max_len, head_dim,
                               dropout_p, softmax_scale, seed)
    return QKVPackedAttentionFunction.apply(_unit_last_stride(qkv), problem)


def compile_specs() -> list[CompileSpec]:
    """Every kernel variant a call can launch, for the offline compile check: each shipped config of each kernel
    on its arch, for fp16/bf16/fp32, every head_dim block, each layout, with and without dropout."""
    kernels = (_attention_fwd_kernel, _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel)
    # Strides and head_dim are multiples of 16 on typical calls (head_dim is), so the JIT marks them divisible.
    divisible_scalars = {name for kernel in kernels for name in kernel.fn.arg_names if name.startswith("stride_")}
    divisible_scalars.add("head_dim")
    score_tile = lambda c: c["BLOCK_M"] * c["BLOCK_N"]  # noqa: E731
    specs = []
    for torch_dtype, dtype in TRITON_DTYPE.items():
        types = {arg: f"*{dtype}" for arg in ("Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV")}
        types.update(Lse="*fp32", Delta="*fp32", KeyMask="*u8", CuSeqlens="*i32",
                     scale_log2="fp32", softmax_scale="fp32", dropout_scale="fp32")
        for block_d in BLOCK_DS:
            for layout, (is_varlen, has_mask) in LAYOUTS.items():
                for dropout in (True, False):
                    flags = dict(IS_VARLEN=is_varlen, HAS_MASK=has_mask, HAS_DROPOUT=dropout, DOT_IN_FP32=False,
                                 BLOCK_D=block_d)
                    label = f"D{block_d},{layout}" + (",dropout" if dropout else "")
                    for kernel, table in zip(kernels, (FWD_CONFIGS, DKDV_CONFIGS, DQ_CONFIGS)):
                        for arch, archs in ARCHS.items():
                            for config in shipped_configs(table, block_d, torch_dtype.itemsize, arch):
                                specs.append(compile_spec(kernel, config, dtype, types, flags, label,
                                                          divisible_scalars, elements_per_iteration=score_tile,
                                                          archs=archs))
            for is_varlen in (True, False):
                specs.append(compile_spec(_attention_bwd_delta_kernel, DELTA_CONFIG, dtype, types,
                                          dict(IS_VARLEN=is_varlen, BLOCK_D=block_d),
                                          f"D{block_d}," + ("varlen" if is_varlen else "padded"), divisible_scalars,
                                          elements_per_iteration=lambda c: c["BLOCK_M"] * c["BLOCK_D"]))
    return specs
