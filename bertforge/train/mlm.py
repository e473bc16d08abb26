"""Masked-LM batches from token shards: packed BERT pairs, dynamic masking, resumable and DDP-sharded.

    shards = build_shards()                                  # packaged news corpus, MiniLM (bert-base-uncased) vocab
    train = MLMBatches(shards, batch_size=32, max_seq_length=128, seed=0, rank=rank, world_size=world_size)
    batch = next(train)                                      # input_ids, token_type_ids, attention_mask, labels
    state = train.state_dict()                               # goes into the checkpoint; load_state_dict resumes
    for batch in heldout_batches(shards, batch_size=64): ...  # same masks at every evaluation

Sequences. BERT's pairs without next-sentence prediction: B is always the true continuation of A (RoBERTa found
that dropping NSP does not hurt; stacking's comparisons only need the MLM loss). Packing, order and masks come from
explicit seeds, never from global RNG state.
"""

import math
from collections.abc import Iterator

import numpy as np
import torch

from bertforge.model import IGNORE_INDEX, TokenPacking, mlm_label_positions
from bertforge.train.shards import TokenShards
from bertforge.train.tokenizer import Vocab

HELDOUT_SEED = 1234  # held-out packing and masks never depend on the run's seed, so runs compare on the same batches


def pack_sequences(shards: TokenShards, split: str, max_seq_length: int, seed: int = 0,
                   short_seq_prob: float = 0.1) -> np.ndarray:
    """BERT pairs [CLS] A [SEP] B [SEP] of at most max_seq_length tokens, from consecutive sentences of one document.

    Returns (N, 3) int64 token offsets (start, cut, end): A = tokens[start:cut], B = tokens[cut:end]. Chunks fill up
    to max_seq_length - 3 tokens (with probability short_seq_prob a random shorter target, as BERT); A ends at a
    random sentence boundary inside the chunk; a one-sentence chunk has no B (cut == end). Sentences longer than the
    budget are cut into pieces, so every token of the split is in exactly one sequence.
    """
    budget = max_seq_length - 3
    if budget < 2:
        raise ValueError(f"max_seq_length must be at least 5, got {max_seq_length}")
    rng = np.random.default_rng(seed)
    rows = []

    def target():
        return budget if rng.random() >= short_seq_prob else int(rng.integers(2, budget + 1))

    def emit(bounds, first, last):  # chunk = pieces first..last-1, i.e. tokens bounds[first]:bounds[last]
        cut = bounds[int(rng.integers(first + 1, last))] if last - first >= 2 else bounds[last]
        rows.append((bounds[first], cut, bounds[last]))

    for doc in shards.documents(split):
        bounds = shards.sentence_offsets[shards.document_offsets[doc]:shards.document_offsets[doc + 1] + 1]
        if np.diff(bounds).max() > budget:
            bounds = np.concatenate([np.arange(s, e, budget) for s, e in zip(bounds[:-1], bounds[1:])] + [bounds[-1:]])
        bounds = bounds.tolist()
        first, limit = 0, target()
        for last in range(1, len(bounds) - 1):
            if bounds[last + 1] - bounds[first] > limit:  # the next piece would overflow: close the chunk
                emit(bounds, first, last)
                first, limit = last, target()
        emit(bounds, first, len(bounds) - 1)
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def mask_tokens(input_ids: torch.Tensor, vocab: Vocab, generator: torch.Generator,
                mask_prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of a (B, S) int64 batch: in each row, round(mask_prob * n) of its n non-special tokens (at
    least one) are chosen; 80% become [MASK], 10% a random plain token, 10% stay. Returns (inputs, labels), labels
    the original id where chosen and -100 elsewhere. Special tokens and padding are never chosen."""
    special = torch.isin(input_ids, vocab.special_ids)
    candidates = (~special).sum(1)
    count = torch.where(candidates > 0, (candidates * mask_prob).round().clamp(min=1), 0)
    # A row's chosen tokens are its `count` candidates of lowest random score (specials score 2, above any rand).
    score = torch.rand(input_ids.shape, generator=generator).masked_fill(special, 2.0)
    chosen = score.argsort(1).argsort(1) < count[:, None]
    action = torch.rand(input_ids.shape, generator=generator)
    draws = torch.randint(len(vocab.replacement_ids), (input_ids.numel(),), generator=generator)
    # index_select, not replacement_ids[draws]: advanced indexing took 20 ms here on a busy 2-core CPU (OpenMP)
    random_ids = vocab.replacement_ids.index_select(0, draws).view(input_ids.shape)
    inputs = torch.where(chosen & (action < 0.8), vocab.mask_id, input_ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, input_ids, IGNORE_INDEX)


def _seed(*keys: int) -> int:
    """A seed mixed from integer keys, so the streams of (seed, epoch, step, rank) never overlap."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _collate(shards: TokenShards, rows: np.ndarray, max_seq_length: int,
             pad_to_multiple_of: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (B, S) int64 and token types of the pairs `rows`, padded to the longest rounded up to a multiple of
    pad_to_multiple_of (at most max_seq_length), and their (B,) lengths."""
    vocab = shards.vocab
    a_len, b_len = rows[:, 1] - rows[:, 0], rows[:, 2] - rows[:, 1]
    lengths = a_len + b_len + 2 + (b_len > 0)
    width = min(-(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of, max_seq_length)
    ids = np.full((len(rows), width), vocab.pad_id, dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    for i, (start, cut, end) in enumerate(rows.tolist()):
        a, b = cut - start, end - cut
        ids[i, 0] = vocab.cls_id
        ids[i, 1:1 + a] = shards.tokens[start:cut]
        ids[i, 1 + a] = vocab.sep_id
        if b:
            ids[i, 2 + a:2 + a + b] = shards.tokens[cut:end]
            ids[i, 2 + a + b] = vocab.sep_id
            types[i, 2 + a:3 + a + b] = 1
    return torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(lengths)


def _batch(input_ids, token_type_ids, lengths, labels) -> dict:
    """The model's inputs, with the index tensors that the model would otherwise compute on the device (a host
    sync on a GPU) built here on the CPU: the packing of the real tokens and the labelled positions."""
    attention_mask = torch.arange(input_ids.shape[1]) < lengths[:, None]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels, "packing": TokenPacking.from_attention_mask(attention_mask),
            "label_positions": mlm_label_positions(labels)}


class MLMBatches:
    """Endless masked-LM batches of one split: dicts of CPU tensors input_ids, token_type_ids, labels (B, S) int64
    and attention_mask (B, S) bool, with S the batch's longest sequence rounded up to a multiple of 8.

    Each epoch is a fresh seeded shuffle of the packed sequences; global step g of an epoch takes the next
    world_size * batch_size of them and rank r its r-th slice, so ranks are disjoint and in lockstep (the remainder
    of an epoch, fewer than world_size * batch_size sequences, is skipped). Masks are drawn when a batch is made,
    from a torch.Generator seeded by (seed, epoch, step, rank): the position (epoch, step) is the whole state.
    """

    def __init__(self, shards: TokenShards, batch_size: int, max_seq_length: int = 128, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, split: str = "train", mask_prob: float = 0.15,
                 short_seq_prob: float = 0.1, pad_to_multiple_of: int = 8):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards, self.batch_size, self.max_seq_length = shards, batch_size, max_seq_length
        self.seed, self.rank, self.world_size, self.mask_prob = seed, rank, world_size, mask_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sequences = pack_sequences(shards, split, max_seq_length, seed=seed, short_seq_prob=short_seq_prob)
        self.batches_per_epoch = len(self.sequences) // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"the {split} split packs into {len(self.sequences)} sequences of <= {max_seq_length} "
                             f"tokens: fewer than one step of {world_size} x {batch_size}")
        self.epoch, self.step = 0, 0
        self._order = None

    def __iter__(self) -> "MLMBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._order is None or self._order[0] != self.epoch:
            shuffle = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
            self._order = (self.epoch, torch.randperm(len(self.sequences), generator=shuffle).numpy())
        start = (self.step * self.world_size + self.rank) * self.batch_size
        rows = self.sequences[self._order[1][start:start + self.batch_size]]
        input_ids, token_type_ids, lengths = _collate(self.shards, rows, self.max_seq_length, self.pad_to_multiple_of)
        masks = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.step, self.rank))
        input_ids, labels = mask_tokens(input_ids, self.shards.vocab, masks, self.mask_prob)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return _batch(input_ids, token_type_ids, lengths, labels)

    def _config(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "max_seq_length": self.max_seq_length, "num_sequences": len(self.sequences)}

    def state_dict(self) -> dict:
        """Position of the next batch, plus the settings it is only valid with; the same on every rank."""
        return {"epoch": self.epoch, "step": self.step, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
        if mismatched:
            raise ValueError("data state is from another configuration (saved, current): "
                             + ", ".join(f"{k} {saved} != {now}" for k, (saved, now) in mismatched.items()))
        self.epoch, self.step = state["epoch"], state["step"]


def heldout_batches(shards: TokenShards, batch_size: int, max_seq_length: int = 128, *,
                    max_batches: int | None = None, rank: int = 0, world_size: int = 1, mask_prob: float = 0.15,
                    pad_to_multiple_of: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the held-out documents, as MLMBatches yields them, identical at every call: full-length packing
    and each sequence's mask seeded by its index, so the loss compares across evaluations, runs, batch sizes and
    world sizes. Covers the set once (or its first max_batches batches); rank r takes batches r, r + world_size, ...
    """
    rows = pack_sequences(shards, "heldout", max_seq_length, seed=HELDOUT_SEED, short_seq_prob=0.0)
    num_batches = math.ceil(len(rows) / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for b in range(rank, num_batches, world_size):
        first = b * batch_size
        input_ids, token_type_ids, lengths = _collate(shards, rows[first:first + batch_size], max_seq_length,
                                                      pad_to_multiple_of)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, n in enumerate(lengths.tolist()):
            masks = torch.Generator().manual_seed(_seed(HELDOUT_SEED, first + i))
            masked, label = mask_tokens(input_ids[i:i + 1, :n], shards.vocab, masks, mask_prob)
            input_ids[i, :n], labels[i, :n] = masked[0], label[0]
        yield _batch(input_ids, token_type_ids, lengths, labels)
