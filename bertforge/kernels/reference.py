"""Plain-PyTorch versions of every fused op, with the public signatures.

They are the CPU path (what training runs on without a GPU) and the readable statement of each op's math.
Half-precision inputs are computed in float32 and cast back, as the kernels do.
"""

import math

import torch
import torch.nn.functional as F

from .dropout import dropout


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention(q, k, v, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
              softmax_scale=None):
    """softmax(q k^T * scale, keys masked) v, bidirectional. A query with no real key gets zeros.

    Padded: q, k, v (batch, heads, seq, head_dim), key_padding_mask (batch, seq) bool, True = real.
    Packed: q, k, v (total_tokens, heads, head_dim), cu_seqlens (batch+1,) int32; max_seqlen is not needed.
    Attention-probability dropout draws its mask with `bertforge.kernels.dropout` (the Triton kernel uses its
    own Philox stream instead, so the two paths drop different elements).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is not None:
        return _varlen_attention(q, k, v, cu_seqlens, dropout_p, scale)
    if key_padding_mask is None:
        return _padded_attention(q, k, v, None, dropout_p, scale)
    # A sequence with no real key would make softmax NaN: let it see every key, then zero its output.
    has_key = key_padding_mask.any(dim=-1)
    out = _padded_attention(q, k, v, key_padding_mask | ~has_key[:, None], dropout_p, scale)
    return out * has_key[:, None, None, None].to(out.dtype)


def _padded_attention(q, k, v, key_mask, dropout_p, scale):
    """(batch, heads, seq, d) attention; key_mask (batch, seq) bool with at least one True per row, or None."""
    dtype = _compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    if dropout_p == 0.0:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    else:  # spelled out, so that the probabilities' dropout mask comes from the CPU-cheap `dropout`
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
        if attn_mask is not None:
            scores.masked_fill_(~attn_mask, float("-inf"))  # scores is this call's own fresh tensor
        out = torch.matmul(dropout(torch.softmax(scores, dim=-1), dropout_p), v)
    return out.to(q.dtype)


def _length_bucket(length: int, longest: int) -> int:
    """Padded width for a sequence: the next power of two from 16 up, capped at the batch's longest sequence."""
    return min(longest, max(16, 1 << (length - 1).bit_length()))


def _varlen_attention(q, k, v, cu_seqlens, dropout_p, scale):
    """Packed attention as a few padded calls, one per power-of-two length bucket.

    Padding every sequence to the longest wastes most of the work on real batches (paragraph lengths are
    skewed: a handful of long ones, many short); one call per distinct length is slow on packed batches with
    dozens of lengths. Buckets bound the padding to 2x and the calls to log2(longest / 16) + 1.
    """
    starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
    lengths_list = lengths.tolist()
    longest = max(lengths_list, default=0)
    buckets = {}
    for seq, length in enumerate(lengths_list):
        if length:  # an empty sequence has no queries
            buckets.setdefault(_length_bucket(length, longest), []).append(seq)
    token_index, outputs = [], []
    for width, seqs in buckets.items():
        full = all(lengths_list[s] == width for s in seqs)  # no padding in this bucket: no key mask to apply
        seqs = torch.tensor(seqs, device=q.device)
        positions = torch.arange(width, device=q.device)
        real = positions[None, :] < lengths[seqs, None]  # (n, width)
        # Padding slots read token 0: they are masked as keys and their query outputs are dropped.
        index = torch.where(real, starts[seqs, None] + positions, 0).flatten()
        qb, kb, vb = (t.index_select(0, index).unflatten(0, real.shape).transpose(1, 2) for t in (q, k, v))
        out = _padded_attention(qb, kb, vb, None if full else real, dropout_p, scale)  # (n, heads, width, d)
        keep = real.flatten()
        outputs.append(out.transpose(1, 2).flatten(0, 1)[keep])
        token_index.append(index[keep])
    if not outputs:
        return torch.zeros_like(q)
    return torch.zeros_like(q).index_copy(0, torch.cat(token_index), torch.cat(outputs))


def layer_norm(x, weight, bias, eps=1e-12, residual=None, dropout_p=0.0):
    """LayerNorm(dropout(x) + residual) over the last dimension, in the residual's dtype (x's without one);
    statistics in float32 (or float64 for float64 input)."""
    h = dropout(x, dropout_p) if dropout_p > 0.0 else x
    if residual is not None:
        h = h.to(residual.dtype) + residual
    dtype = _compute_dtype(h.dtype)
    y = F.layer_norm(h.to(dtype), h.shape[-1:], weight.to(dtype), bias.to(dtype), eps)
    return y.to(h.dtype)


def bias_gelu(x, bias, approximate="none", scale=None):
    """GELU(x + bias), times `scale` per column when given; approximate="none" is BERT's exact erf form, "tanh" the
    tanh approximation."""
    dtype = _compute_dtype(x.dtype)
    y = F.gelu(x.to(dtype) + bias.to(dtype), approximate=approximate)
    return (y if scale is None else y * scale.to(dtype)).to(x.dtype)
