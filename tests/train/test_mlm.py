"""MLM batches: BERT pair packing, masking, batching, resume and DDP sharding."""

import json
import math

import numpy as np
import pytest
import torch
from corpus_samples import batches_equal, original_ids, small_shards

from bertforge.train.mlm import (
    HELDOUT_SEED,
    IGNORE_INDEX,
    MLMBatches,
    _collate,
    heldout_batches,
    mask_tokens,
    pack_sequences,
)
from bertforge.train.shards import TokenShards
from bertforge.train.tokenizer import Vocab, load_tokenizer


def test_packing_covers_each_document_in_order_with_pairs_cut_at_sentences(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    max_len, p = int(rng.integers(6, 80)), float(rng.choice([0.0, 0.1, 0.5]))
    rows = pack_sequences(shards, "train", max_len, seed=int(rng.integers(1000)), short_seq_prob=p)
    starts = set(shards.sentence_offsets.tolist())
    assert (rows[:, 0] < rows[:, 2]).all() and (rows[:, 0] <= rows[:, 1]).all() and (rows[:, 1] <= rows[:, 2]).all()
    assert ((rows[:, 2] - rows[:, 0]) + 2 + (rows[:, 2] > rows[:, 1]) <= max_len).all()
    position = 0
    for doc in shards.documents("train"):
        begin = shards.sentence_offsets[shards.document_offsets[doc]]
        end = shards.sentence_offsets[shards.document_offsets[doc + 1]]
        assert rows[position, 0] == begin
        while rows[position, 2] < end:  # chunks tile the document: no token lost, none repeated
            assert rows[position + 1, 0] == rows[position, 2]
            position += 1
        assert rows[position, 2] == end
        position += 1
    assert position == len(rows)
    has_b = rows[:, 1] < rows[:, 2]
    assert all(c in starts for c in rows[has_b, 1].tolist())  # A/B cut at a sentence boundary
    if max_len >= 48:  # a full budget then holds two sentences (each at most 21 tokens): some pairs exist
        assert has_b.any()


def test_packing_is_deterministic_given_the_seed(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    seed = int(rng.integers(10**6))
    a, b = (pack_sequences(shards, "train", 64, seed=seed) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, pack_sequences(shards, "train", 64, seed=seed + 1))


def test_batches_are_cls_a_sep_b_sep_with_token_types(tmp_path, rng):
    shards = small_shards(tmp_path, rng, heldout_fraction=0.2)
    max_len = int(rng.integers(8, 70))
    rows = pack_sequences(shards, "heldout", max_len, seed=HELDOUT_SEED, short_seq_prob=0.0)
    batch_size = int(rng.integers(1, 9))
    seen = 0
    vocab = shards.vocab
    for batch in heldout_batches(shards, batch_size, max_len):
        ids, types, attention = original_ids(batch), batch["token_type_ids"], batch["attention_mask"]
        width = ids.shape[1]
        assert width <= max_len and (width % 8 == 0 or width == max_len)
        assert batch["input_ids"].dtype == types.dtype == batch["labels"].dtype == torch.int64
        assert attention.dtype == torch.bool
        for i, (start, cut, end) in enumerate(rows[seen:seen + len(ids)].tolist()):
            a, b = shards.tokens[start:cut].tolist(), shards.tokens[cut:end].tolist()
            expected = [vocab.cls_id] + a + [vocab.sep_id] + (b + [vocab.sep_id] if b else [])
            n = len(expected)
            assert ids[i, :n].tolist() == expected and (ids[i, n:] == vocab.pad_id).all()
            assert types[i].tolist() == [0] * (len(a) + 2) + [1] * (n - len(a) - 2) + [0] * (width - n)
            assert attention[i].tolist() == [True] * n + [False] * (width - n)
        seen += len(ids)
    assert seen == len(rows)


def test_masking_statistics(rng):
    vocab = Vocab.from_tokenizer(load_tokenizer())
    batch, width = 64, 512
    ids = vocab.replacement_ids[torch.from_numpy(rng.integers(0, len(vocab.replacement_ids), (batch, width)))]
    lengths = torch.from_numpy(rng.integers(width // 2, width + 1, batch))
    specials = torch.from_numpy(rng.random((batch, width)) < 0.05)
    ids = torch.where(specials, vocab.special_ids[torch.from_numpy(rng.integers(1, 5, (batch, width)))], ids)
    ids[torch.arange(width) >= lengths[:, None]] = vocab.pad_id
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    inputs, labels = mask_tokens(ids, vocab, generator)

    special = torch.isin(ids, vocab.special_ids)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(inputs[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    candidates = (~special).sum(1)
    assert torch.equal(chosen.sum(1), (candidates * 0.15).round().long())  # 15% of each row's real tokens
    n = int(chosen.sum())
    as_mask = (inputs == vocab.mask_id) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~as_mask & ~kept
    for count, p in ((as_mask, 0.8), (replaced, 0.1), (kept, 0.1)):  # within 5 standard deviations
        assert abs(int(count.sum()) - p * n) < 5 * math.sqrt(n * p * (1 - p)) + 5, (int(count.sum()), p, n)
    assert torch.isin(inputs[replaced], vocab.replacement_ids).all()


def test_masking_of_tiny_rows_chooses_at_least_one_real_token(rng):
    vocab = Vocab.from_tokenizer(load_tokenizer())
    real = int(rng.integers(1, 4))
    ids = torch.tensor([[vocab.cls_id] + [2000 + i for i in range(real)] + [vocab.sep_id, vocab.pad_id],
                        [vocab.cls_id, vocab.sep_id] + [vocab.pad_id] * (real + 1)])
    _, labels = mask_tokens(ids, vocab, torch.Generator().manual_seed(int(rng.integers(2**62))))
    assert (labels[0] != IGNORE_INDEX).sum() == 1 and (labels[1] == IGNORE_INDEX).all()


def test_batches_mask_fifteen_percent_and_masks_change_between_epochs(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    batches = MLMBatches(shards, batch_size=4, max_seq_length=64, seed=int(rng.integers(1000)))
    masks = {}
    chosen = candidates = 0
    for _ in range(2 * batches.batches_per_epoch):
        batch = next(batches)
        special = torch.isin(original_ids(batch), shards.vocab.special_ids)
        chosen += int((batch["labels"] != IGNORE_INDEX).sum())
        candidates += int((~special).sum())
        for ids, labels in zip(original_ids(batch), batch["labels"]):
            masks.setdefault(tuple(ids.tolist()), []).append(tuple((labels != IGNORE_INDEX).tolist()))
    assert abs(chosen / candidates - 0.15) < 0.02
    twice = [m for m in masks.values() if len(m) == 2]
    assert twice and sum(m[0] != m[1] for m in twice) >= 0.8 * len(twice)


def test_batches_are_reproducible_from_the_seed(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    seed = int(rng.integers(10**6))
    a, b, c = (MLMBatches(shards, 3, 32, seed=s) for s in (seed, seed, seed + 1))
    first = [next(a) for _ in range(5)]
    assert all(batches_equal(x, next(b)) for x in first)
    assert not all(batches_equal(x, next(c)) for x in first)


def test_resume_continues_with_the_same_batches_and_masks(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    batch_size = int(rng.integers(2, 6))

    def make():  # a fresh process: shards reopened from disk
        return MLMBatches(TokenShards(shards.folder), batch_size, max_seq_length=48, seed=7)

    run = make()
    k = run.batches_per_epoch + int(rng.integers(1, run.batches_per_epoch))  # mid-way through the second epoch
    n = run.batches_per_epoch  # crosses the next epoch boundary
    for _ in range(k):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    expected = [next(run) for _ in range(n)]
    resumed = make()
    resumed.load_state_dict(state)
    assert all(batches_equal(e, next(resumed)) for e in expected)


def test_resume_rejects_a_state_of_another_configuration(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    state = MLMBatches(shards, 4, 64, seed=1).state_dict()
    for other in (dict(seed=2), dict(world_size=2), dict(max_seq_length=32)):
        with pytest.raises(ValueError, match="another configuration"):
            MLMBatches(shards, 4, **{"max_seq_length": 64, "seed": 1, **other}).load_state_dict(state)
    MLMBatches(shards, 4, 64, seed=1, rank=0).load_state_dict(state)


def test_epochs_visit_each_sequence_once_in_a_new_order(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    batches = MLMBatches(shards, int(rng.integers(1, 6)), 64, seed=int(rng.integers(1000)))
    all_sequences = {tuple(ids.tolist()) for ids in _all_packed(shards, batches)}
    epochs = []
    for _ in range(2):
        seen = [tuple(ids[ids != shards.vocab.pad_id].tolist())
                for _ in range(batches.batches_per_epoch) for ids in original_ids(next(batches))]
        assert len(set(seen)) == len(seen) == batches.batches_per_epoch * batches.batch_size
        assert set(seen) <= all_sequences
        epochs.append(seen)
    assert epochs[0] != epochs[1]


def _all_packed(shards, batches) -> list[torch.Tensor]:
    """Every packed sequence of an iterator, without padding, as [CLS] A [SEP] (B [SEP])."""
    ids, _, lengths = _collate(shards, batches.sequences, batches.max_seq_length, 1)
    return [row[:n] for row, n in zip(ids, lengths.tolist())]


def test_ddp_ranks_are_disjoint_and_cover_every_step(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    world_size, batch_size = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    seed = int(rng.integers(1000))
    ranks = [MLMBatches(shards, batch_size, 64, seed=seed, rank=r, world_size=world_size)
             for r in range(world_size)]
    single = MLMBatches(shards, batch_size * world_size, 64, seed=seed)
    assert {r.batches_per_epoch for r in ranks} == {single.batches_per_epoch}
    seen = []
    for _ in range(single.batches_per_epoch):
        per_rank = [original_ids(next(r)) for r in ranks]
        step = [tuple(ids[ids != shards.vocab.pad_id].tolist()) for b in per_rank for ids in b]
        # the ranks' slices together are exactly the single-process global batch
        assert step == [tuple(ids[ids != shards.vocab.pad_id].tolist()) for ids in original_ids(next(single))]
        seen += step
    assert len(set(seen)) == len(seen) == single.batches_per_epoch * batch_size * world_size
    assert len(single.sequences) - len(seen) < batch_size * world_size


def test_heldout_batches_are_the_same_at_every_call_and_batch_size(tmp_path, rng):
    shards = small_shards(tmp_path, rng, heldout_fraction=0.2)

    def rows(batches):
        return [(ids[:n].tolist(), labels[:n].tolist(), types[:n].tolist())
                for b in batches for ids, labels, types, n in
                zip(b["input_ids"], b["labels"], b["token_type_ids"], b["attention_mask"].sum(1).tolist())]

    reference = rows(heldout_batches(shards, 4, 64))
    assert rows(heldout_batches(shards, 4, 64)) == reference
    assert rows(heldout_batches(shards, int(rng.integers(1, 9)), 64)) == reference
    world_size = int(rng.integers(2, 4))
    sharded = [list(heldout_batches(shards, 2, 64, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(rows(b for s in sharded for b in s)) == sorted(reference)
    assert len(list(heldout_batches(shards, 2, 64, max_batches=1))) == 1
    masked = sum(sum(label != IGNORE_INDEX for label in labels) for _, labels, _ in reference)
    assert masked > 0


def test_batches_carry_the_packing_and_labelled_positions_of_their_own_mask_and_labels(tmp_path, rng):
    """Built on the CPU so that the model does not compute them on the device (a host sync each)."""
    shards = small_shards(tmp_path, rng)
    for batch in [next(MLMBatches(shards, 8, 64)), next(heldout_batches(shards, batch_size=8, max_seq_length=64))]:
        batch["packing"].check_matches(batch["attention_mask"])
        labelled = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
        assert torch.equal(batch["label_positions"], labelled)
