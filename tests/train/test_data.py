"""Data pipeline: corpus reading and its errors, shards and their cache, BERT pair packing, masking, batching,
resume and DDP sharding. Small random corpora in tmp_path (a fresh seed per test, printed on failure), plus the
real news corpus."""

import json
import math
import secrets
import time

import numpy as np
import pytest
import torch

from bertforge.train import corpus, data

WORDS = ("the cat sat on a mat while dogs ran across green fields under bright blue skies and people talked "
         "about history science music art with friends in small towns near old rivers").split()


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


def random_sentence(rng, max_words=20) -> str:
    words = " ".join(rng.choice(WORDS, int(rng.integers(2, max_words + 1))))  # "A." alone reads as an initial
    return words[0].upper() + words[1:] + str(rng.choice([".", "!", "?"]))


def random_document(rng, max_sentences=12) -> list[list[str]]:
    """Paragraphs of sentences."""
    n = int(rng.integers(1, max_sentences + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(int(rng.integers(0, 3)), n - 1), replace=False))
    sentences = [random_sentence(rng) for _ in range(n)]
    return [list(p) for p in np.split(np.array(sentences, dtype=object), cuts)]


def as_text(document: list[list[str]]) -> str:
    return "\n".join(" ".join(p) for p in document)


def write_corpus(path, documents: list[str]):
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def small_shards(tmp_path, rng, num_docs=60, **kwargs) -> data.TokenShards:
    docs = [as_text(random_document(rng)) for _ in range(num_docs)]
    write_corpus(tmp_path / "corpus.txt", docs)
    return data.build_shards(tmp_path / "corpus.txt", cache_dir=tmp_path / "cache", progress=False, **kwargs)


def original_ids(batch) -> torch.Tensor:
    return torch.where(batch["labels"] != data.IGNORE_INDEX, batch["labels"], batch["input_ids"])


def batches_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Reading text


def test_split_sentences_cuts_lines_and_sentence_punctuation(rng):
    document = random_document(rng)
    assert data.split_sentences(as_text(document)) == [s for p in document for s in p]
    text = 'Mr. Smith met Sen. Warren in the U.S. Capitol. "Why?" he asked.\nShe left (at 5.) 3 cats stayed. Plan A! Go'
    assert data.split_sentences(text) == ["Mr. Smith met Sen. Warren in the U.S. Capitol.", '"Why?" he asked.',
                                          "She left (at 5.)", "3 cats stayed.", "Plan A!", "Go"]


def test_read_documents_splits_every_txt_file_on_blank_lines(tmp_path, rng):
    docs = [as_text(random_document(rng)) for _ in range(9)]
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(("\r\n \r\n".join(docs[:3])).replace("\n", "\r\n").encode())  # CRLF, blank-ish
    write_corpus(tmp_path / "b" / "z.txt", docs[3:6])  # sorted by path: a.txt, b/z.txt, b.txt
    write_corpus(tmp_path / "b.txt", docs[6:])
    (tmp_path / "notes.md").write_text("not a document")
    assert list(data.read_documents(tmp_path)) == docs


def test_missing_corpus_is_an_error(tmp_path):
    with pytest.raises(data.CorpusError, match="does not exist.*nowhere"):
        data.build_shards(tmp_path / "nowhere", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("layout", ["empty file", "blank file", "empty folder", "folder without .txt"])
def test_empty_corpus_is_an_error(tmp_path, layout):
    source = tmp_path / "corpus"
    if layout.endswith("file"):
        source.write_text("" if layout == "empty file" else " \n\n\t\n")
    else:
        source.mkdir()
        if layout == "folder without .txt":
            (source / "readme.md").write_text("Some text.")
    with pytest.raises(data.CorpusError, match="empty"):
        data.build_shards(source, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no partial shards


def test_non_utf8_file_error_names_file_and_byte_offset(tmp_path, rng):
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "a_good.txt", [as_text(random_document(rng)) for _ in range(3)])
    prefix = as_text(random_document(rng)).encode()
    (tmp_path / "corpus" / "b_bad.txt").write_bytes(prefix + "Café au lait.".encode("latin-1"))
    offset = len(prefix) + 3  # the 0xe9 of latin-1 "é"
    with pytest.raises(data.CorpusError, match=rf"b_bad\.txt is not UTF-8: byte 0xe9 at offset {offset} "):
        data.build_shards(tmp_path / "corpus", cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # the failed build left no partial folder


def test_single_document_corpus_is_an_error(tmp_path, rng):
    write_corpus(tmp_path / "one.txt", [as_text(random_document(rng))])
    with pytest.raises(data.CorpusError, match="single document"):
        data.build_shards(tmp_path / "one.txt", cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and shards


def test_vocab_txt_and_tokenizer_json_tokenize_alike(tokenizer):
    from_vocab = data.load_tokenizer(corpus.minilm_checkpoint() / "vocab.txt")
    text = "Café Müller's naïve ROBOT said: 'Über-efficient' tokenizers cost $3.50 (≈ €3)!"
    assert from_vocab.encode(text).ids == tokenizer.encode(text).ids
    assert from_vocab.encode(text, "And B.").type_ids == tokenizer.encode(text, "And B.").type_ids
    vocab = data.Vocab.from_tokenizer(tokenizer)
    assert (vocab.size, vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (
        30522, 0, 100, 101, 102, 103)
    assert len(vocab.replacement_ids) == 30522 - 5 - 994  # no specials, no [unusedN]


def test_special_token_text_stays_plain_text(tmp_path, rng, tokenizer):
    docs = [as_text(random_document(rng)) + " [MASK] [CLS] x [SEP] [PAD] [UNK]" for _ in range(4)]
    write_corpus(tmp_path / "c.txt", docs)
    shards = data.build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    assert not np.isin(shards.tokens, shards.vocab.special_ids.numpy()).any()
    assert tokenizer.encode("[MASK]").ids == tokenizer.encode("[ mask ]").ids  # and no padding to 128


def test_shards_hold_every_sentence_tokenized(tmp_path, rng, tokenizer):
    documents = [random_document(rng) for _ in range(int(rng.integers(5, 40)))]
    write_corpus(tmp_path / "c.txt", [as_text(d) for d in documents])
    shards = data.build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    sentences = [s for d in documents for p in d for s in p]
    assert shards.tokens.dtype == np.uint16
    assert shards.num_documents == len(documents) and len(shards.sentence_offsets) == len(sentences) + 1
    for i, sentence in enumerate(sentences):
        got = shards.tokens[shards.sentence_offsets[i]:shards.sentence_offsets[i + 1]]
        assert got.tolist() == tokenizer.encode(sentence, add_special_tokens=False).ids
    expected_documents = np.cumsum([0] + [sum(len(p) for p in d) for d in documents])
    np.testing.assert_array_equal(shards.document_offsets, expected_documents)
    assert shards.meta["num_tokens"] == len(shards.tokens) == shards.sentence_offsets[-1]


def test_large_vocabulary_shards_are_int32(tmp_path, rng):
    words = (corpus.minilm_checkpoint() / "vocab.txt").read_text().splitlines()
    (tmp_path / "vocab.txt").write_text("\n".join(words + [f"zz{i}" for i in range(40000)]) + "\n")
    write_corpus(tmp_path / "c.txt", [as_text(random_document(rng)) + " zz39999" for _ in range(3)])
    shards = data.build_shards(tmp_path / "c.txt", tmp_path / "vocab.txt", cache_dir=tmp_path / "cache",
                               progress=False)
    assert shards.tokens.dtype == np.int32 and shards.vocab.size == 70522
    assert shards.tokens.max() == 70521


def test_heldout_split_is_disjoint_and_keyed_by_content(tmp_path, rng):
    docs = [as_text(random_document(rng)) for _ in range(int(rng.integers(50, 400)))]
    fraction = float(rng.uniform(0.01, 0.05))
    texts = {}
    for name, order in (("forward", docs), ("reversed", docs[::-1])):
        write_corpus(tmp_path / f"{name}.txt", order)
        shards = data.build_shards(tmp_path / f"{name}.txt", cache_dir=tmp_path / "cache", progress=False,
                                   heldout_fraction=fraction)
        train, heldout = shards.documents("train"), shards.documents("heldout")
        assert len(heldout) == max(math.ceil(fraction * len(docs)), 4)
        assert np.intersect1d(train, heldout).size == 0
        np.testing.assert_array_equal(np.union1d(train, heldout), np.arange(len(docs)))
        texts[name] = {shards.document_tokens(d).tobytes() for d in heldout}
    assert texts["forward"] == texts["reversed"]


def test_shard_cache_is_reused_and_rebuilt_when_the_corpus_changes(tmp_path, rng, monkeypatch):
    docs = [as_text(random_document(rng)) for _ in range(20)]
    write_corpus(tmp_path / "c.txt", docs)
    first = data.build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized a cached corpus")

    with monkeypatch.context() as patch:
        patch.setattr(data, "read_documents", fail)
        patch.setattr(data, "_write_shards", fail)
        again = data.build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    assert again.folder == first.folder
    write_corpus(tmp_path / "c.txt", docs + [as_text(random_document(rng))])
    changed = data.build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    assert changed.folder != first.folder and changed.num_documents == 21
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.folder.name, changed.folder.name])


def test_learned_vocabulary_tokenizes_the_corpus_without_unknowns(tmp_path, rng, monkeypatch):
    documents = [random_document(rng) for _ in range(40)]
    write_corpus(tmp_path / "c.txt", [as_text(d) for d in documents])
    shards = data.build_shards(tmp_path / "c.txt", vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
    vocab = shards.vocab
    assert [vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id] == [0, 1, 2, 3, 4]
    assert 100 < vocab.size <= 300 and shards.meta["vocab_size"] == vocab.size
    assert vocab.unk_id not in set(np.unique(shards.tokens).tolist())
    sentences = [s for d in documents for p in d for s in p]
    for i in rng.choice(len(sentences), 20, replace=False):
        ids = shards.tokens[shards.sentence_offsets[i]:shards.sentence_offsets[i + 1]].tolist()
        assert "".join(shards.tokenizer.decode(ids).split()) == "".join(sentences[i].lower().split())

    def fail(*args, **kwargs):
        raise AssertionError("learned the vocabulary again for a cached build")

    with monkeypatch.context() as patch:
        patch.setattr(data, "train_tokenizer", fail)
        assert data.build_shards(tmp_path / "c.txt", vocab_size=300, cache_dir=tmp_path / "cache",
                                 progress=False).folder == shards.folder
    smaller = data.build_shards(tmp_path / "c.txt", vocab_size=256, cache_dir=tmp_path / "cache", progress=False)
    assert smaller.folder != shards.folder and smaller.vocab.size <= 256


def test_learned_vocabulary_arguments_are_checked(tmp_path, rng):
    write_corpus(tmp_path / "c.txt", [as_text(random_document(rng)) for _ in range(5)])
    with pytest.raises(ValueError, match="either a tokenizer or a vocab_size"):
        data.build_shards(tmp_path / "c.txt", tmp_path / "vocab.txt", vocab_size=1000, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size must be >= 256"):
        data.build_shards(tmp_path / "c.txt", vocab_size=100, cache_dir=tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Packing and batches


def test_packing_covers_each_document_in_order_with_pairs_cut_at_sentences(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    max_len, p = int(rng.integers(6, 80)), float(rng.choice([0.0, 0.1, 0.5]))
    rows = data.pack_sequences(shards, "train", max_len, seed=int(rng.integers(1000)), short_seq_prob=p)
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
    a, b = (data.pack_sequences(shards, "train", 64, seed=seed) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.pack_sequences(shards, "train", 64, seed=seed + 1))


def test_batches_are_cls_a_sep_b_sep_with_token_types(tmp_path, rng):
    shards = small_shards(tmp_path, rng, heldout_fraction=0.2)
    max_len = int(rng.integers(8, 70))
    rows = data.pack_sequences(shards, "heldout", max_len, seed=data.HELDOUT_SEED, short_seq_prob=0.0)
    batch_size = int(rng.integers(1, 9))
    seen = 0
    vocab = shards.vocab
    for batch in data.heldout_batches(shards, batch_size, max_len):
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
    vocab = data.Vocab.from_tokenizer(data.load_tokenizer())
    batch, width = 64, 512
    ids = vocab.replacement_ids[torch.from_numpy(rng.integers(0, len(vocab.replacement_ids), (batch, width)))]
    lengths = torch.from_numpy(rng.integers(width // 2, width + 1, batch))
    specials = torch.from_numpy(rng.random((batch, width)) < 0.05)
    ids = torch.where(specials, vocab.special_ids[torch.from_numpy(rng.integers(1, 5, (batch, width)))], ids)
    ids[torch.arange(width) >= lengths[:, None]] = vocab.pad_id
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    inputs, labels = data.mask_tokens(ids, vocab, generator)

    special = torch.isin(ids, vocab.special_ids)
    chosen = labels != data.IGNORE_INDEX
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
    vocab = data.Vocab.from_tokenizer(data.load_tokenizer())
    real = int(rng.integers(1, 4))
    ids = torch.tensor([[vocab.cls_id] + [2000 + i for i in range(real)] + [vocab.sep_id, vocab.pad_id],
                        [vocab.cls_id, vocab.sep_id] + [vocab.pad_id] * (real + 1)])
    _, labels = data.mask_tokens(ids, vocab, torch.Generator().manual_seed(int(rng.integers(2**62))))
    assert (labels[0] != data.IGNORE_INDEX).sum() == 1 and (labels[1] == data.IGNORE_INDEX).all()


def test_batches_mask_fifteen_percent_and_masks_change_between_epochs(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    batches = data.MLMBatches(shards, batch_size=4, max_seq_length=64, seed=int(rng.integers(1000)))
    masks = {}
    chosen = candidates = 0
    for _ in range(2 * batches.batches_per_epoch):
        batch = next(batches)
        special = torch.isin(original_ids(batch), shards.vocab.special_ids)
        chosen += int((batch["labels"] != data.IGNORE_INDEX).sum())
        candidates += int((~special).sum())
        for ids, labels in zip(original_ids(batch), batch["labels"]):
            masks.setdefault(tuple(ids.tolist()), []).append(tuple((labels != data.IGNORE_INDEX).tolist()))
    assert abs(chosen / candidates - 0.15) < 0.02
    twice = [m for m in masks.values() if len(m) == 2]
    assert twice and sum(m[0] != m[1] for m in twice) >= 0.8 * len(twice)


def test_batches_are_reproducible_from_the_seed(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    seed = int(rng.integers(10**6))
    a, b, c = (data.MLMBatches(shards, 3, 32, seed=s) for s in (seed, seed, seed + 1))
    first = [next(a) for _ in range(5)]
    assert all(batches_equal(x, next(b)) for x in first)
    assert not all(batches_equal(x, next(c)) for x in first)


def test_resume_continues_with_the_same_batches_and_masks(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    batch_size = int(rng.integers(2, 6))

    def make():  # a fresh process: shards reopened from disk
        return data.MLMBatches(data.TokenShards(shards.folder), batch_size, max_seq_length=48, seed=7)

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
    state = data.MLMBatches(shards, 4, 64, seed=1).state_dict()
    for other in (dict(seed=2), dict(world_size=2), dict(max_seq_length=32)):
        with pytest.raises(ValueError, match="another configuration"):
            data.MLMBatches(shards, 4, **{"max_seq_length": 64, "seed": 1, **other}).load_state_dict(state)
    data.MLMBatches(shards, 4, 64, seed=1, rank=0).load_state_dict(state)


def test_epochs_visit_each_sequence_once_in_a_new_order(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    batches = data.MLMBatches(shards, int(rng.integers(1, 6)), 64, seed=int(rng.integers(1000)))
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
    ids, _, lengths = data._collate(shards, batches.sequences, batches.max_seq_length, 1)
    return [row[:n] for row, n in zip(ids, lengths.tolist())]


def test_ddp_ranks_are_disjoint_and_cover_every_step(tmp_path, rng):
    shards = small_shards(tmp_path, rng)
    world_size, batch_size = int(rng.integers(2, 5)), int(rng.integers(1, 4))
    seed = int(rng.integers(1000))
    ranks = [data.MLMBatches(shards, batch_size, 64, seed=seed, rank=r, world_size=world_size)
             for r in range(world_size)]
    single = data.MLMBatches(shards, batch_size * world_size, 64, seed=seed)
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

    reference = rows(data.heldout_batches(shards, 4, 64))
    assert rows(data.heldout_batches(shards, 4, 64)) == reference
    assert rows(data.heldout_batches(shards, int(rng.integers(1, 9)), 64)) == reference
    world_size = int(rng.integers(2, 4))
    sharded = [list(data.heldout_batches(shards, 2, 64, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sorted(rows(b for s in sharded for b in s)) == sorted(reference)
    assert len(list(data.heldout_batches(shards, 2, 64, max_batches=1))) == 1
    masked = sum(sum(label != data.IGNORE_INDEX for label in labels) for _, labels, _ in reference)
    assert masked > 0


# ---------------------------------------------------------------------------------------------------------------
# The real news corpus


def test_news_subset_builds_real_batches(tmp_path, rng, tokenizer):
    articles = corpus.news_articles()
    chosen = sorted(rng.choice(len(articles), 40, replace=False).tolist())
    (tmp_path / "news").mkdir()
    for i in chosen:
        (tmp_path / "news" / f"{i:05d}.txt").write_text(articles[i], encoding="utf-8")
    shards = data.build_shards(tmp_path / "news", cache_dir=tmp_path / "cache", progress=False)
    assert shards.num_documents == 40
    words = sum(len(articles[i].split()) for i in chosen)
    assert 1.05 < shards.meta["num_tokens"] / words < 1.6  # WordPiece on English news
    title = articles[chosen[0]].splitlines()[0]
    first = shards.tokens[:shards.sentence_offsets[1]].tolist()
    assert first == tokenizer.encode(data.split_sentences(title)[0], add_special_tokens=False).ids
    batch = next(data.MLMBatches(shards, 8, 128))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128


@pytest.mark.slow
def test_default_news_corpus_builds_into_shards(tmp_path):
    started = time.perf_counter()
    shards = data.build_shards(cache_dir=tmp_path, progress=False)
    seconds = time.perf_counter() - started
    print(f"built {shards.meta} in {seconds:.1f} s")
    assert shards.meta["name"] == "news" and shards.num_documents > 3800
    assert 2.5e6 < len(shards.tokens) < 3.0e6 and shards.tokens.dtype == np.uint16
    assert 38 <= len(shards.documents("heldout")) <= 80
    assert len(data.MLMBatches(shards, 32, 128).sequences) > 20000
    assert data.build_shards(cache_dir=tmp_path, progress=False).folder == shards.folder
