"""Token shards: every sentence tokenized, the held-out split, the cache, and the real news corpus."""

import math
import time

import numpy as np
import pytest
from corpus_samples import as_text, random_document, write_corpus

import bertforge.train.shards
from bertforge.train import corpus
from bertforge.train.mlm import MLMBatches
from bertforge.train.shards import build_shards
from bertforge.train.text import CorpusError, split_sentences


def test_shards_hold_every_sentence_tokenized(tmp_path, rng, tokenizer):
    documents = [random_document(rng) for _ in range(int(rng.integers(5, 40)))]
    write_corpus(tmp_path / "c.txt", [as_text(d) for d in documents])
    shards = build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
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
    shards = build_shards(tmp_path / "c.txt", tmp_path / "vocab.txt", cache_dir=tmp_path / "cache",
                               progress=False)
    assert shards.tokens.dtype == np.int32 and shards.vocab.size == 70522
    assert shards.tokens.max() == 70521


def test_heldout_split_is_disjoint_and_keyed_by_content(tmp_path, rng):
    docs = [as_text(random_document(rng)) for _ in range(int(rng.integers(50, 400)))]
    fraction = float(rng.uniform(0.01, 0.05))
    texts = {}
    for name, order in (("forward", docs), ("reversed", docs[::-1])):
        write_corpus(tmp_path / f"{name}.txt", order)
        shards = build_shards(tmp_path / f"{name}.txt", cache_dir=tmp_path / "cache", progress=False,
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
    first = build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized a cached corpus")

    with monkeypatch.context() as patch:
        patch.setattr(bertforge.train.shards, "read_documents", fail)
        patch.setattr(bertforge.train.shards, "_write_shards", fail)
        again = build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    assert again.folder == first.folder
    write_corpus(tmp_path / "c.txt", docs + [as_text(random_document(rng))])
    changed = build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    assert changed.folder != first.folder and changed.num_documents == 21
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.folder.name, changed.folder.name])


def test_news_subset_builds_real_batches(tmp_path, rng, tokenizer):
    articles = corpus.news_articles()
    chosen = sorted(rng.choice(len(articles), 40, replace=False).tolist())
    (tmp_path / "news").mkdir()
    for i in chosen:
        (tmp_path / "news" / f"{i:05d}.txt").write_text(articles[i], encoding="utf-8")
    shards = build_shards(tmp_path / "news", cache_dir=tmp_path / "cache", progress=False)
    assert shards.num_documents == 40
    words = sum(len(articles[i].split()) for i in chosen)
    assert 1.05 < shards.meta["num_tokens"] / words < 1.6  # WordPiece on English news
    title = articles[chosen[0]].splitlines()[0]
    first = shards.tokens[:shards.sentence_offsets[1]].tolist()
    assert first == tokenizer.encode(split_sentences(title)[0], add_special_tokens=False).ids
    batch = next(MLMBatches(shards, 8, 128))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128


@pytest.mark.slow
def test_default_news_corpus_builds_into_shards(tmp_path):
    started = time.perf_counter()
    shards = build_shards(cache_dir=tmp_path, progress=False)
    seconds = time.perf_counter() - started
    print(f"built {shards.meta} in {seconds:.1f} s")
    assert shards.meta["name"] == "news" and shards.num_documents > 3800
    assert 2.5e6 < len(shards.tokens) < 3.0e6 and shards.tokens.dtype == np.uint16
    assert 38 <= len(shards.documents("heldout")) <= 80
    assert len(MLMBatches(shards, 32, 128).sequences) > 20000
    assert build_shards(cache_dir=tmp_path, progress=False).folder == shards.folder


@pytest.mark.parametrize("damage", ["swap two token ids", "truncate the offsets"])
def test_a_damaged_shard_cache_is_refused_by_name(tmp_path, rng, damage):
    write_corpus(tmp_path / "c.txt", [as_text(random_document(rng)) for _ in range(20)])
    shards = build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    if damage == "swap two token ids":  # same size, same dtype: only the recorded checksum can tell
        tokens = np.fromfile(shards.folder / "tokens.bin", dtype=shards.tokens.dtype)
        i, j = np.flatnonzero(tokens != tokens[0])[0], 0
        tokens[[i, j]] = tokens[[j, i]]
        tokens.tofile(shards.folder / "tokens.bin")
    else:
        data = (shards.folder / "sentences.npy").read_bytes()
        (shards.folder / "sentences.npy").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorpusError, match=f"shard cache {shards.folder} is corrupt .*delete the folder"):
        build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
