"""Index tensors a data collator builds on the CPU, so that the model's code on a GPU never makes the host wait.

Finding the real tokens of a padded batch (`nonzero`, the longest length) or its labelled positions reads the
data; on a GPU that is a device-to-host sync per step, which stalls the queue of work. Computed on the CPU where
the batch is made and moved with it, they need no sync:

    packing = TokenPacking.from_attention_mask(attention_mask)      # in the collator, on the CPU
    label_positions = mlm_label_positions(labels)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}   # tensors and TokenPacking alike
    model(**batch)
"""

import dataclasses

import torch

from bertforge.kernels.padding import unpad

IGNORE_INDEX = -100  # label of a position without an MLM target (as in Hugging Face and torch's cross_entropy)


@dataclasses.dataclass(frozen=True, eq=False)  # no field-wise ==: tensors have no single truth value
class TokenPacking:
    """Where the real tokens of a padded (batch, seq) batch are.

    indices: int64 (n_real_tokens,), the flat positions of real tokens in the (batch * seq) grid, row-major.
    cu_seqlens: int32 (batch + 1,), offsets of each sequence's real tokens in the packed layout.
    max_seqlen: the longest sequence's number of real tokens (a Python int, so no device read is needed).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> "TokenPacking":
        """From a (batch, seq) 0/1 or bool mask; reads the mask, so call it on the CPU (in the collator)."""
        _, indices, cu_seqlens, max_seqlen = unpad(attention_mask, attention_mask)  # the gathered mask is unused
        return cls(indices, cu_seqlens, max_seqlen)

    def to(self, device, non_blocking: bool = False) -> "TokenPacking":
        return TokenPacking(self.indices.to(device, non_blocking=non_blocking),
                            self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    def pin_memory(self) -> "TokenPacking":
        """Page-locked copies, so that `.to(device, non_blocking=True)` is asynchronous (DataLoader calls this)."""
        return TokenPacking(self.indices.pin_memory(), self.cu_seqlens.pin_memory(), self.max_seqlen)

    def check_layout(self, batch: int, seq: int, device: torch.device):
        """Raise ValueError unless dtypes, shapes and device fit a (batch, seq) batch on `device`; reads no values."""
        for name, t, dtype, shape in (("indices", self.indices, torch.int64, None),
                                      ("cu_seqlens", self.cu_seqlens, torch.int32, (batch + 1,))):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
                got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"packing.{name} must be a 1-D {dtype} tensor, got {got}")
            if shape is not None and tuple(t.shape) != shape:
                raise ValueError(f"packing.{name} must have shape {shape} for a batch of {batch}, "
                                 f"got {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"packing.{name} is on {t.device}, input_ids on {device}")
        if self.indices.numel() > batch * seq:
            raise ValueError(f"packing.indices has {self.indices.numel()} entries, more than the batch's "
                             f"{batch} x {seq} positions")
        if not isinstance(self.max_seqlen, int) or not 0 <= self.max_seqlen <= seq:
            raise ValueError(f"packing.max_seqlen must be an int in [0, {seq}], got {self.max_seqlen!r}")

    def check_matches(self, attention_mask: torch.Tensor):
        """Raise ValueError unless this is the packing of `attention_mask`; reads values (a sync on a GPU)."""
        expected = TokenPacking.from_attention_mask(attention_mask)
        for name in ("indices", "cu_seqlens"):
            if not torch.equal(getattr(self, name), getattr(expected, name)):
                raise ValueError(f"packing.{name} does not match attention_mask; build it with "
                                 "TokenPacking.from_attention_mask(attention_mask)")
        if self.max_seqlen != expected.max_seqlen:
            raise ValueError(f"packing.max_seqlen = {self.max_seqlen} but attention_mask's longest sequence has "
                             f"{expected.max_seqlen} tokens")


def mlm_label_positions(labels: torch.Tensor) -> torch.Tensor:
    """int64 (n_labelled,): the flat positions, row-major, where labels (batch, seq) != IGNORE_INDEX.
    Reads the labels, so call it on the CPU (in the collator)."""
    return (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)
