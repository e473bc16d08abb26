"""Random inputs and small configs shared by the model tests (imported by name: tests/model is on sys.path)."""

import torch

from bertforge.model import BertConfig


def tiny_config(**overrides) -> BertConfig:
    """A few-thousand-parameter BERT: fast enough for every CPU test, head_dim 16 (the kernels' minimum)."""
    fields = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                  max_position_embeddings=40, type_vocab_size=2)
    return BertConfig(**{**fields, **overrides})


def ragged_batch(vocab_size, lengths, seqlen=None, type_vocab_size=2, pad_token_id=0):
    """Random ids, token types and a right-padded mask for sequences of the given lengths (ids avoid padding)."""
    lengths = torch.as_tensor(lengths)
    seqlen = seqlen or int(lengths.max())
    mask = torch.arange(seqlen)[None, :] < lengths[:, None]
    ids = torch.randint(1, vocab_size, (len(lengths), seqlen))
    ids = torch.where(mask, ids, torch.full_like(ids, pad_token_id))
    types = torch.randint(0, type_vocab_size, ids.shape) * mask
    return ids, mask.long(), types


def random_lengths(batch, seqlen):
    """Ragged lengths in [1, seqlen]: one sequence of a single token, one full, the rest at random."""
    lengths = torch.randint(1, seqlen + 1, (batch,))
    lengths[0], lengths[-1] = 1, seqlen
    return lengths[torch.randperm(batch)]


def mlm_labels(ids, mask, vocab_size, fraction=0.15):
    """Labels at a random ~fraction of the real tokens (at least one), -100 elsewhere."""
    chosen = (torch.rand(ids.shape) < fraction) & mask.bool()
    first_real = mask.bool().nonzero()[0]
    chosen[first_real[0], first_real[1]] = True
    return torch.where(chosen, torch.randint(0, vocab_size, ids.shape), torch.full_like(ids, -100))
