"""The multi-exit benchmark's choice of exit rule, its stream serving (three ways, one answer) and its table."""

import random

import pytest
import torch

from bertforge.bench import multi_exit
from bertforge.model import BertConfig, MultiExitBert
from bertforge.train.classification_data import LabelledData


def test_chosen_rule_is_the_fastest_within_a_point_else_the_most_accurate():
    rows = [{"value": v, "accuracy": a, "speed_up": s}
            for v, a, s in [(0.1, 0.820, 1.0), (0.3, 0.812, 1.6), (0.5, 0.805, 2.4), (0.7, 0.600, 5.0)]]
    assert multi_exit.chosen_rule(rows, 0.82)["value"] == 0.3
    assert multi_exit.chosen_rule(rows, 0.815)["value"] == 0.5
    assert multi_exit.chosen_rule(rows, 0.95)["value"] == 0.1


@pytest.mark.parametrize("criterion, value", [("entropy", 0.6), ("patience", 1)])
def test_serving_a_stream_three_ways_gives_one_accuracy_a_table_and_a_plot(reference_kernels, criterion, value,
                                                                          tmp_path):
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=128, num_labels=2)
    model = MultiExitBert(config, exit_pooling="mean").eval()
    with torch.no_grad():  # exits spread apart, so that samples leave at different layers
        for e in model.exits:
            e.classifier.weight.normal_(0, 2.0)
    words = "a fine film with a dull plot and great actors but a long and tired end".split()
    texts = [" ".join(random.choices(words, k=random.randint(1, 30))) for _ in range(70)]
    stream = LabelledData(texts, None, [random.randint(0, 1) for _ in texts], ["neg", "pos"])
    result = multi_exit.serving_throughput(model, stream, criterion, value)
    assert result["requests"] == 70
    ways = [result[w] for w in ("all_layers", "shrinking_batch", "pools")]
    assert all(w["sequences_per_s"] > 0 for w in ways)
    assert ways[1]["accuracy"] == ways[2]["accuracy"]  # the same rule gives the same predictions
    table = multi_exit.markdown({"baselines": {}, "runs": {"m": {"test_exit_accuracy": [0.5] * 4,
                                                                  "train_seconds": 1.0}},
                                 "speed": {}, "serving": {"m": [result]}})
    assert f"| {criterion} | {value} | {ways[0]['sequences_per_s']:.1f} |" in table
    multi_exit.plot_serving({"serving": {"m": [result]}}, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 10_000
