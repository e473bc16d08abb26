"""Corpus reading: documents, sentences, and the errors of a bad corpus."""

import pytest
from corpus_samples import as_text, random_document, write_corpus

from bertforge.train.shards import build_shards
from bertforge.train.text import CorpusError, read_documents, split_sentences


def test_split_sentences_cuts_lines_and_sentence_punctuation(rng):
    document = random_document(rng)
    assert split_sentences(as_text(document)) == [s for p in document for s in p]
    text = 'Mr. Smith met Sen. Warren in the U.S. Capitol. "Why?" he asked.\nShe left (at 5.) 3 cats stayed. Plan A! Go'
    assert split_sentences(text) == ["Mr. Smith met Sen. Warren in the U.S. Capitol.", '"Why?" he asked.',
                                          "She left (at 5.)", "3 cats stayed.", "Plan A!", "Go"]


def test_read_documents_splits_every_txt_file_on_blank_lines(tmp_path, rng):
    docs = [as_text(random_document(rng)) for _ in range(9)]
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_bytes(("\r\n \r\n".join(docs[:3])).replace("\n", "\r\n").encode())  # CRLF, blank-ish
    write_corpus(tmp_path / "b" / "z.txt", docs[3:6])  # sorted by path: a.txt, b/z.txt, b.txt
    write_corpus(tmp_path / "b.txt", docs[6:])
    (tmp_path / "notes.md").write_text("not a document")
    assert list(read_documents(tmp_path)) == docs


def test_missing_corpus_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="does not exist.*nowhere"):
        build_shards(tmp_path / "nowhere", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("layout", ["empty file", "blank file", "empty folder", "folder without .txt"])
def test_empty_corpus_is_an_error(tmp_path, layout):
    source = tmp_path / "corpus"
    if layout.endswith("file"):
        source.write_text("" if layout == "empty file" else " \n\n\t\n")
    else:
        source.mkdir()
        if layout == "folder without .txt":
            (source / "readme.md").write_text("Some text.")
    with pytest.raises(CorpusError, match="empty"):
        build_shards(source, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no partial shards


def test_non_utf8_file_error_names_file_and_byte_offset(tmp_path, rng):
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "a_good.txt", [as_text(random_document(rng)) for _ in range(3)])
    prefix = as_text(random_document(rng)).encode()
    (tmp_path / "corpus" / "b_bad.txt").write_bytes(prefix + "Café au lait.".encode("latin-1"))
    offset = len(prefix) + 3  # the 0xe9 of latin-1 "é"
    with pytest.raises(CorpusError, match=rf"b_bad\.txt is not UTF-8: byte 0xe9 at offset {offset} "):
        build_shards(tmp_path / "corpus", cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # the failed build left no partial folder


def test_single_document_corpus_is_an_error(tmp_path, rng):
    write_corpus(tmp_path / "one.txt", [as_text(random_document(rng))])
    with pytest.raises(CorpusError, match="single document"):
        build_shards(tmp_path / "one.txt", cache_dir=tmp_path / "cache", progress=False)
