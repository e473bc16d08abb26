"""Move between the padded (batch, seq, ...) layout and the packed (total_tokens, ...) layout."""

import torch


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """(batch, seq, ...) + bool/int mask (batch, seq) -> (tokens (total, ...), indices, cu_seqlens int32, max_seqlen)."""
    mask = attention_mask.bool()
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return hidden.flatten(0, 1).index_select(0, indices), indices, cu_seqlens, max_seqlen


def pad(tokens: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of `unpad`: scatter (total, ...) tokens back to (batch, seq, ...), zeros at padding."""
    out = tokens.new_zeros((batch * seqlen,) + tuple(tokens.shape[1:]))
    out.index_copy_(0, indices, tokens)
    return out.view((batch, seqlen) + tuple(tokens.shape[1:]))


def varlen_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int):
    """(total, heads, d) packed by cu_seqlens -> ((batch, heads, max_seqlen, d), key_padding_mask (batch, max_seqlen))."""
    batch = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    mask = torch.arange(max_seqlen, device=x.device)[None, :] < lengths[:, None]
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    return pad(x, indices, batch, max_seqlen).transpose(1, 2), mask


def padded_to_varlen(x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, d) -> (total, heads, d), keeping the positions where the mask is True."""
    return x.transpose(1, 2)[key_padding_mask]
