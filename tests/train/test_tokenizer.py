"""Tokenizers: shipped vocabularies and vocabularies learned from a corpus."""

import numpy as np
import pytest
from corpus_samples import as_text, random_document, write_corpus

import bertforge.train.shards
from bertforge.train import corpus
from bertforge.train.shards import build_shards
from bertforge.train.tokenizer import Vocab, load_tokenizer


def test_vocab_txt_and_tokenizer_json_tokenize_alike(tokenizer):
    from_vocab = load_tokenizer(corpus.minilm_checkpoint() / "vocab.txt")
    text = "Café Müller's naïve ROBOT said: 'Über-efficient' tokenizers cost $3.50 (≈ €3)!"
    assert from_vocab.encode(text).ids == tokenizer.encode(text).ids
    assert from_vocab.encode(text, "And B.").type_ids == tokenizer.encode(text, "And B.").type_ids
    vocab = Vocab.from_tokenizer(tokenizer)
    assert (vocab.size, vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id) == (
        30522, 0, 100, 101, 102, 103)
    assert len(vocab.replacement_ids) == 30522 - 5 - 994  # no specials, no [unusedN]


def test_special_token_text_stays_plain_text(tmp_path, rng, tokenizer):
    docs = [as_text(random_document(rng)) + " [MASK] [CLS] x [SEP] [PAD] [UNK]" for _ in range(4)]
    write_corpus(tmp_path / "c.txt", docs)
    shards = build_shards(tmp_path / "c.txt", cache_dir=tmp_path / "cache", progress=False)
    assert not np.isin(shards.tokens, shards.vocab.special_ids.numpy()).any()
    assert tokenizer.encode("[MASK]").ids == tokenizer.encode("[ mask ]").ids  # and no padding to 128


def test_learned_vocabulary_tokenizes_the_corpus_without_unknowns(tmp_path, rng, monkeypatch):
    documents = [random_document(rng) for _ in range(40)]
    write_corpus(tmp_path / "c.txt", [as_text(d) for d in documents])
    shards = build_shards(tmp_path / "c.txt", vocab_size=300, cache_dir=tmp_path / "cache", progress=False)
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
        patch.setattr(bertforge.train.shards, "train_tokenizer", fail)
        assert build_shards(tmp_path / "c.txt", vocab_size=300, cache_dir=tmp_path / "cache",
                                 progress=False).folder == shards.folder
    smaller = build_shards(tmp_path / "c.txt", vocab_size=256, cache_dir=tmp_path / "cache", progress=False)
    assert smaller.folder != shards.folder and smaller.vocab.size <= 256


def test_learned_vocabulary_arguments_are_checked(tmp_path, rng):
    write_corpus(tmp_path / "c.txt", [as_text(random_document(rng)) for _ in range(5)])
    with pytest.raises(ValueError, match="either a tokenizer or a vocab_size"):
        build_shards(tmp_path / "c.txt", tmp_path / "vocab.txt", vocab_size=1000, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size must be >= 256"):
        build_shards(tmp_path / "c.txt", vocab_size=100, cache_dir=tmp_path, progress=False)
