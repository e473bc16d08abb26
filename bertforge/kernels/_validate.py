"""Input checks shared by the Triton ops and their references, so bad input fails the same way on every path."""

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = tuple(range(16, 129, 16))  # 16, 32, ..., 128


def checks_values(t: torch.Tensor) -> bool:
    """Whether to run checks that read a tensor's values: always for CPU tensors (free), for device tensors only
    with BERTFORGE_DEBUG=1, since reading device memory from Python waits for the GPU (a host sync)."""
    return t.device.type == "cpu" or os.environ.get("BERTFORGE_DEBUG", "0") == "1"


def _check_float(name, t, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_attention_inputs(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                           allowed_dtypes=FLOAT_DTYPES):
    """Validate an attention call; return (is_varlen, batch, heads, seqlen_or_max_seqlen, head_dim).

    cu_seqlens' values (and max_seqlen against them) are checked only where `checks_values` allows: on a GPU
    without BERTFORGE_DEBUG=1, max_seqlen must be given and is trusted (too small a value gives wrong results).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t, allowed_dtypes)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is not None and not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be a multiple of 16 between 16 and 128, got {head_dim}")

    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed layout)")
        if q.dim() != 4:
            raise ValueError(f"padded layout expects q of shape (batch, heads, seq, head_dim), got {tuple(q.shape)}")
        batch, heads, seqlen, _ = q.shape
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                got = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
                raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {got}")
            if tuple(key_padding_mask.shape) != (batch, seqlen):
                raise ValueError(
                    f"key_padding_mask must have shape (batch, seq) = {(batch, seqlen)}, got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
        return False, batch, heads, seqlen, head_dim

    if key_padding_mask is not None:
        raise ValueError("pass either key_padding_mask (padded layout) or cu_seqlens (packed layout), not both")
    if q.dim() != 3:
        raise ValueError(f"packed layout expects q of shape (total_tokens, heads, head_dim), got {tuple(q.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
        raise TypeError(f"cu_seqlens must be an int32 tensor, got {got}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with batch+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    total, heads, _ = q.shape
    batch = cu_seqlens.numel() - 1
    if torch.compiler.is_compiling():  # value checks would sync and break the graph
        return True, batch, heads, int(max_seqlen) if max_seqlen is not None else total, head_dim
    if not checks_values(cu_seqlens):  # a device tensor: reading it would wait for the GPU once per call
        if max_seqlen is None:
            raise ValueError("max_seqlen must be given with cu_seqlens on a GPU: computing it reads cu_seqlens "
                             "(a host sync); pass the longest sequence's length, or set BERTFORGE_DEBUG=1")
        return True, batch, heads, int(max_seqlen), head_dim  # trusted: BERTFORGE_DEBUG=1 checks it
    offsets = cu_seqlens.cpu()
    lengths = offsets[1:] - offsets[:-1]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(offsets[0])}")
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets.tolist()}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens[-1] must equal total_tokens = {total}, got {int(offsets[-1])}")
    longest = int(lengths.max())
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest sequence ({longest})")
    return True, batch, heads, int(max_seqlen), head_dim


def _check_has_features(x):
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., N); got a 0-dim tensor")


def check_layer_norm_inputs(x, weight, bias, eps, residual, dropout_p=0.0):
    _check_float("x", x)
    _check_has_features(x)
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        _check_float(name, t)
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


def check_bias_gelu_inputs(x, bias, approximate, scale=None):
    _check_float("x", x)
    _check_float("bias", bias)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' (exact erf GELU) or 'tanh', got {approximate!r}")
    _check_has_features(x)
    n = x.shape[-1]
    for name, vector in (("bias", bias), ("scale", scale)):
        if vector is None:
            continue
        _check_float(name, vector)
        if vector.dim() != 1 or vector.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(vector.shape)}")
        if vector.device != x.device:
            raise ValueError(f"{name} is on {vector.device}, x on {x.device}")
