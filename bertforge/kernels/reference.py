"""Plain-PyTorch versions of every fused op, with the public signatures.

They are the CPU path (what training runs on without a GPU) and the readable statement of each op's math.
Half-precision inputs are computed in float32 and cast back, as the kernels do.
"""

import math

import torch
import torch.nn.functional as F

from .padding import padded_to_varlen, varlen_to_padded


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention(q, k, v, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
              softmax_scale=None):
    """softmax(q k^T * scale, keys masked) v, bidirectional. A query with no real key gets zeros.

    Padded: q, k, v (batch, heads, seq, head_dim), key_padding_mask (batch, seq) bool, True = real.
    Packed: q, k, v (total_tokens, heads, head_dim), cu_seqlens (batch+1,) int32.
    """
    if cu_seqlens is not None:
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        (qp, mask), (kp, _), (vp, _) = (varlen_to_padded(t, cu_seqlens, max_seqlen) for t in (q, k, v))
        out = attention(qp, kp, vp, key_padding_mask=mask, dropout_p=dropout_p, softmax_scale=softmax_scale)
        return padded_to_varlen(out, mask)

    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = _compute_dtype(q.dtype)
    attn_mask, has_key = None, None
    if key_padding_mask is not None:
        # A sequence with no real key would make softmax NaN: let it see every key, then zero its output.
        has_key = key_padding_mask.any(dim=-1)
        attn_mask = (key_padding_mask | ~has_key[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=attn_mask,
                                         dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out.to(q.dtype)


def layer_norm(x, weight, bias, eps=1e-12, residual=None):
    """LayerNorm(x + residual) over the last dimension, statistics in float32 (or float64 for float64 input)."""
    h = x if residual is None else x + residual
    dtype = _compute_dtype(x.dtype)
    y = F.layer_norm(h.to(dtype), h.shape[-1:], weight.to(dtype), bias.to(dtype), eps)
    return y.to(x.dtype)


def bias_gelu(x, bias, approximate="none"):
    """GELU(x + bias); approximate="none" is BERT's exact erf form, "tanh" the tanh approximation."""
    dtype = _compute_dtype(x.dtype)
    return F.gelu(x.to(dtype) + bias.to(dtype), approximate=approximate).to(x.dtype)
