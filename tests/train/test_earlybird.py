"""`bertforge earlybird` end to end on a tiny BERT: the ticket comes from the coefficients the search ended with and
the detector's rule, the ticket model is the rewound model pruned, a stopped run resumes bit for bit, the random
ticket keeps the sizes, multi-exit fine-tuning runs on the ticket (also of a stacked pre-trained model), and
mistakes end in one line."""

import json
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_config

from bertforge.model import BertForSequenceClassification, MultiExitBert
from bertforge.model.slimming import draw_ticket, mask_distance, prune
from bertforge.train.checkpoint import load_checkpoint
from bertforge.train.cli import main as cli_main
from bertforge.train.earlybird import EarlybirdConfig, earlybird
from bertforge.train.pretrain import pretrain
from bertforge.train.tokenizer import load_tokenizer


def run_config(checkpoint, data, out_dir, **overrides):
    values = dict(checkpoint=checkpoint, data=data, out_dir=str(out_dir), epochs=1, batch_size=16,
                  max_seq_length=32, lr=1e-3, eval_interval=4, log_interval=1, checkpoint_interval=100,
                  progress=False, record_interval=1, window=3, threshold=0.2, head_ratio=0.5, search_epochs=2)
    values.update(overrides)
    return EarlybirdConfig(**values)


def tickets_of(records, cfg):
    return [torch.cat([*map(torch.Tensor.flatten, h), *f]) for h, f in
            (draw_ticket(r["heads"], r["ffn"], cfg.head_ratio, cfg.ffn_ratio, cfg.rank_by) for r in records)]


def test_the_ticket_is_drawn_where_the_detector_rule_first_holds_and_the_ticket_model_is_the_rewound_one_pruned(
        checkpoint, sentiment_tsv, tmp_path):
    cfg = run_config(checkpoint, sentiment_tsv, tmp_path / "run")
    summary = earlybird(cfg)
    run = tmp_path / "run"
    ticket = torch.load(run / "ticket.pt", weights_only=False)
    searched = load_checkpoint(run / "search" / "checkpoint.pt")
    assert searched["step"] == ticket["step"] == ticket["records"][-1]["step"]
    layers = range(len(ticket["head_keep"]))
    for i in layers:  # the ticket's coefficients are the model's when the search ended
        assert torch.equal(ticket["records"][-1]["heads"][i],
                           searched["model"][f"bert.encoder.layers.{i}.attention.head_scale"])
    assert not all(torch.equal(h, torch.ones_like(h)) for h in ticket["records"][-1]["heads"])  # they trained

    # The early-bird rule, recomputed from the records: the newest ticket within the threshold of each of the
    # window - 1 before it. The search ends at the first record where it holds, or at its end if it never does.
    masks = tickets_of(ticket["records"], cfg)
    settled = [k for k in range(cfg.window - 1, len(masks))
               if all(mask_distance(masks[k], masks[j]) < cfg.threshold for j in range(k - cfg.window + 1, k))]
    if ticket["drawn_by"].startswith("early bird"):
        assert settled == [len(masks) - 1]
    else:
        assert not settled and ticket["drawn_by"].startswith("end of the search")
    assert summary["heads_per_layer"] == [1, 1, 1]  # 2 heads a layer, half pruned
    assert sum(summary["intermediate_size_per_layer"]) == 3 * 64 - round(0.4 * 3 * 64)

    rewound = BertForSequenceClassification.from_pretrained(run / "search" / "rewind")
    expected = prune(rewound, ticket["head_keep"], ticket["ffn_keep"]).state_dict()
    pruned = BertForSequenceClassification.from_pretrained(run / "ticket-model")
    assert pruned.config.heads_per_layer == [1, 1, 1] and pruned.config.slimming
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    retrain = [json.loads(line) for line in (run / "retrain" / "log.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "best" for r in retrain) and summary["retrain_steps"] == retrain[-1]["step"]
    assert summary["total_train_time"] == pytest.approx(summary["search_train_time"] + summary["retrain_train_time"])
    assert (run / "mask_distance.png").stat().st_size > 10_000


def test_a_stopped_search_resumes_bit_for_bit(checkpoint, sentiment_tsv, tmp_path):
    whole = earlybird(run_config(checkpoint, sentiment_tsv, tmp_path / "a", draw_step=5, eval_interval=0))
    assert earlybird(run_config(checkpoint, sentiment_tsv, tmp_path / "b", draw_step=5, eval_interval=0,
                                stop_after=3)) == {"phase": "search", "stopped": True}
    resumed = earlybird(run_config(checkpoint, sentiment_tsv, tmp_path / "b", draw_step=5, eval_interval=0,
                                   resume=True))
    assert resumed["step"] == whole["step"] == 5 and resumed["drawn_by"] == "draw_step 5"
    a, b = (torch.load(tmp_path / run / "ticket.pt", weights_only=False) for run in ("a", "b"))
    assert all(torch.equal(x, y) for x, y in zip(a["ffn_keep"], b["ffn_keep"]))
    retrained = [load_checkpoint(tmp_path / run / "retrain" / "checkpoint.pt")["model"] for run in ("a", "b")]
    for name, value in retrained[0].items():
        assert torch.equal(retrained[1][name], value), f"{name} differs after resuming"


def test_the_random_ticket_keeps_the_sizes_and_multi_exit_trains_on_a_ticket(checkpoint, sentiment_tsv, tmp_path):
    earlybird(run_config(checkpoint, sentiment_tsv, tmp_path / "eb", draw_step=3, eval_interval=0))
    summary = earlybird(run_config(checkpoint, sentiment_tsv, tmp_path / "random", ticket_from=str(tmp_path / "eb"),
                                   random_ticket=True, recipe="romebert", exit_pooling="mean"))
    drawn = torch.load(tmp_path / "eb" / "ticket.pt", weights_only=False)
    assert summary["heads_per_layer"] == [int(k.sum()) for k in drawn["head_keep"]]
    assert summary["search_train_time"] == 0.0
    pruned = json.loads((tmp_path / "random" / "ticket-model" / "config.json").read_text())
    assert pruned["intermediate_size_per_layer"] == [int(k.sum()) for k in drawn["ffn_keep"]]
    best = json.loads((tmp_path / "random" / "retrain" / "best" / "config.json").read_text())
    assert "exit_layout" in best and best["heads_per_layer"] == [1, 1, 1]  # a multi-exit model, pruned


def test_stack_then_ticket_then_exits_on_one_model(corpus, sentiment_tsv, tmp_path):
    """Pre-training stacks 1 -> 2 layers; `bertforge convert` writes the folder with the run's vocabulary;
    `bertforge earlybird` searches a ticket on it and trains RomeBERT's exits on the pruned model."""
    pretrain(tiny_config(corpus, tmp_path / "pretrain", stages="1:2,2:2"))
    cli_main(["convert", "--checkpoint", str(tmp_path / "pretrain" / "checkpoint.pt"), "--out_dir",
              str(tmp_path / "hf")])
    earlybird(run_config(str(tmp_path / "hf"), sentiment_tsv, tmp_path / "eb", draw_step=3,
                         recipe="romebert", exit_pooling="mean"))
    folder = tmp_path / "eb" / "retrain" / "best"
    model = MultiExitBert.from_pretrained(folder).eval()
    assert model.config.num_hidden_layers == 2 and model.config.heads_per_layer == [1, 1]
    tokens = load_tokenizer(folder).encode("the film was good")
    with torch.no_grad():
        exits = model(torch.tensor([tokens.ids])).exit_logits
    assert len(exits) == 2 and all(torch.isfinite(e).all() for e in exits)


@pytest.mark.parametrize("flags, expected", [
    (["--head_ratio", "1"], "head_ratio must be in [0, 1)"),
    (["--ffn_l1", "-1"], "ffn_l1 must be >= 0"),
    (["--random_ticket", "true"], "random_ticket draws at the sizes of a searched ticket"),
    (["--after_draw", "restart"], "after_draw must be one of"),
    (["--window", "1"], "window must be >= 2"),
])
def test_bad_settings_end_in_one_line(flags, expected, tmp_path):
    with pytest.raises(SystemExit) as error:
        cli_main(["earlybird", *flags, "--out_dir", str(tmp_path)])
    assert expected in str(error.value.code)


def test_a_used_folder_or_a_missing_ticket_is_refused(checkpoint, sentiment_tsv, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "ticket.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="already holds a run"):
        cli_main(["earlybird", "--out_dir", str(tmp_path / "used"), "--data", sentiment_tsv])
    with pytest.raises(SystemExit, match="no ticket.pt there"):
        cli_main(["earlybird", "--out_dir", str(tmp_path / "new"), "--ticket_from", str(tmp_path / "none"),
                  "--data", sentiment_tsv])
    assert not Path(tmp_path / "new" / "retrain").exists()


def test_the_search_trains_the_coefficients_with_the_l1_term(checkpoint, sentiment_tsv, tmp_path):
    """With a huge L1 weight every coefficient falls below its start (1); the task alone raises some."""
    earlybird(run_config(checkpoint, sentiment_tsv, tmp_path / "run", draw_step=3, eval_interval=0, head_l1=1e3,
                         ffn_l1=1e3))
    last = torch.load(tmp_path / "run" / "ticket.pt", weights_only=False)["records"][-1]
    assert all(bool((c < 1).all()) for c in [*last["heads"], *last["ffn"]])


def test_torchrun_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs in one process"):
        cli_main(["earlybird", "--out_dir", str(tmp_path / "run")])
