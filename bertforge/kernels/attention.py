"""PLACEHOLDER until the Triton kernel lands: validates, then runs the reference."""

from . import reference
from ._validate import check_attention_inputs


def attention(q, k, v, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None, dropout_p=0.0,
              softmax_scale=None):
    check_attention_inputs(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale)
    return reference.attention(q, k, v, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
                               max_seqlen=max_seqlen, dropout_p=dropout_p, softmax_scale=softmax_scale)
