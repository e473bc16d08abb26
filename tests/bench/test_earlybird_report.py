"""The EarlyBERT benchmark end to end on a tiny BERT: its table and plots hold the three runs' own numbers."""

import json

import pytest

from bertforge.bench import earlybird


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
