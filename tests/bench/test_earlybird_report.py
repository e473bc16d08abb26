"""The EarlyBERT benchmarks end to end on a tiny BERT: their tables and plots hold the runs' own numbers."""

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from bertforge.bench import earlybird, earlybird_pretrain
from bertforge.train.checkpoint import load_checkpoint
from bertforge.train.mlm import heldout_batches
from bertforge.train.pretrain import PretrainConfig
from bertforge.train.shards import build_shards


def test_three_runs_and_their_numbers_in_the_table_and_plots(checkpoint, sentiment_tsv, tmp_path, reference_kernels,
                                                           monkeypatch):
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    result = earlybird.run(out, epochs=1, checkpoint=checkpoint, data=sentiment_tsv, test_data=sentiment_tsv,
                           batch_size=16, max_seq_length=32, lr=1e-3, eval_interval=4,
                           ticket=dict(record_interval=1, window=3, threshold=0.2, head_ratio=0.5))
    tests = {name: json.loads((out / folder / "test.json").read_text())["accuracy"]
             for name, folder in ((earlybird.FULL, "full"), (earlybird.EARLYBIRD, "earlybird/retrain"),
                                  (earlybird.RANDOM, "random/retrain"))}
    assert result["test_accuracy"] == tests
    searched = json.loads((out / "earlybird" / "earlybird.json").read_text())
    assert result["train_time_s"][earlybird.EARLYBIRD] == pytest.approx(
        searched["search_train_time"] + searched["retrain_train_time"])
    assert result["time_saved"] == pytest.approx(
        1 - result["train_time_s"][earlybird.EARLYBIRD] / result["train_time_s"][earlybird.FULL])
    random = json.loads((out / "random" / "earlybird.json").read_text())
    assert random["heads_per_layer"] == searched["heads_per_layer"] == [1, 1, 1]
    assert result["curves"][earlybird.EARLYBIRD][0][0] >= searched["search_train_time"]  # after the search
    table = (out / "results.md").read_text()
    for name, accuracy in tests.items():
        assert f"| {name} | {accuracy:.4f} |" in table
    for plot in ("accuracy_vs_time.png", "mask_distance.png"):
        assert (out / plot).stat().st_size > 10_000


def test_pretraining_runs_and_their_numbers_in_the_table_and_plot(tmp_path, random_corpus, reference_kernels):
    out = tmp_path / "report"
    result = earlybird_pretrain.run(out, "tiny", corpus=random_corpus)
    full, searched, equal_time, small = (earlybird_pretrain.FULL, earlybird_pretrain.EARLYBIRD,
                                         earlybird_pretrain.EARLYBIRD_EQUAL_TIME, earlybird_pretrain.PRUNED_SIZE)
    runs = {full: "full", searched: "earlybird", equal_time: "earlybird-equal-time", small: "pruned-size"}
    logs = {name: [json.loads(line) for line in (out / folder / "log.jsonl").read_text().splitlines()]
            for name, folder in runs.items()}
    ticket = json.loads((out / "earlybird" / "ticket.json").read_text())
    steps = earlybird_pretrain.SCALES["tiny"]["steps"]
    for name, records in logs.items():
        evals = [r for r in records if r["kind"] == "eval"]
        assert result["heldout_loss"][name] == evals[-1]["heldout_loss"]
        assert result["train_time_s"][name] == pytest.approx(evals[-1]["train_time"])
        prunes = [r for r in records if r["kind"] == "prune"]
        if name == full:
            assert not prunes
        elif name == small:  # built at the ticket's sizes, no search
            assert not prunes and not any(r["kind"] == "ticket" for r in records)
            saved = load_checkpoint(out / runs[name] / "checkpoint.pt")["model_config"]
            assert (saved["heads_per_layer"], saved["intermediate_size_per_layer"]) == \
                (ticket["heads_per_layer"], ticket["intermediate_size_per_layer"])
        else:
            assert len(prunes) == 1
    assert [r for r in logs[searched] if r["kind"] == "prune"][0]["heads_per_layer"] == ticket["heads_per_layer"]
    times = result["train_time_s"]
    assert result["steps"][equal_time] == round(steps * times[full] / times[searched])
    assert result["time_saved"] == pytest.approx(1 - times[searched] / times[full])
    assert result["width_matters"] == (result["heldout_loss"][full] < result["heldout_loss"][small])
    table = (out / "results.md").read_text()
    for name in runs:
        assert f"| {name} | {result['steps'][name]} | {times[name]:.0f} s" in table
        assert f"{result['heldout_loss'][name]:.4f} |" in table
    for plot in ("loss_vs_time.png", "mask_distance.png"):
        assert (out / plot).stat().st_size > 10_000
    assert result["unigram_loss"] == pytest.approx(unigram_cross_entropy(
        PretrainConfig(corpus=random_corpus, stages=None, steps=steps,
                       **earlybird_pretrain.SCALES["tiny"]["model"])))


def unigram_cross_entropy(cfg) -> float:
    """torch's cross-entropy of the held-out MLM labels against logits = log(1 + count in the training split)."""
    shards = build_shards(cfg.corpus, cfg.tokenizer, vocab_size=cfg.vocab_size, progress=False)
    counts = Counter(int(t) for doc in shards.documents("train") for t in shards.document_tokens(doc))
    logits = torch.tensor([math.log(1 + counts[i]) for i in range(shards.vocab.size)], dtype=torch.float64)
    labels = torch.cat([b["labels"].flatten() for b in heldout_batches(shards, cfg.batch_size, cfg.max_seq_length,
                                                                       max_batches=cfg.eval_batches)])
    return F.cross_entropy(logits.expand(len(labels), -1), labels).item()  # ignore_index -100: unmasked positions
