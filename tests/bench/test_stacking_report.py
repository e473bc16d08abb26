"""The stacking benchmark's arithmetic and its end-to-end harness at a tiny scale."""

import json
from pathlib import Path

import pytest

from bertforge.bench import stacking


def test_time_to_reach_interpolates_between_evaluations():
    curve = [(0.0, 10.0), (10.0, 8.0), (20.0, 6.0), (30.0, 5.0)]
    assert stacking.time_to_reach(curve, 7.0) == pytest.approx(15.0)
    assert stacking.time_to_reach(curve, 5.0) == pytest.approx(30.0)
    assert stacking.time_to_reach(curve, 4.9) is None
    assert stacking.time_to_reach(curve, 12.0) == 0.0


def test_loss_at_budget():
    curve = [(0.0, 10.0), (10.0, 8.0), (20.0, 6.0)]
    assert stacking.loss_at(curve, 5.0) == pytest.approx(9.0)
    assert stacking.loss_at(curve, 25.0) == 6.0


def test_tiny_run_writes_numbers_table_and_plot(tmp_path, random_corpus, reference_kernels):
    plans = ["1:6,2:6,4:12", "1:12,2:6,4:6"]
    result = stacking.run("tiny", out=str(tmp_path / "report"), corpus=random_corpus, progress=False,
                          stages=plans)

    saved = json.loads((tmp_path / "report" / "stacking.json").read_text())
    names = {"from scratch", "shallow only", "stacking, state reset"} | {f"stacking {plan}" for plan in plans}
    assert saved["target_loss"] == result["curves"]["from scratch"][-1][1]
    assert saved["time_to_target_s"]["from scratch"] == pytest.approx(result["total_train_time_s"]["from scratch"])
    assert set(saved["loss_at_equal_budget"]) == names and set(saved["speedup_to_target"]) == names - {"from scratch"}
    for plan in plans:
        reached = saved["time_to_target_s"][f"stacking {plan}"]
        expected = None if reached is None else saved["time_to_target_s"]["from scratch"] / reached
        assert saved["speedup_to_target"][f"stacking {plan}"] == pytest.approx(expected)
        assert saved["configs"][f"stacking {plan}"]["stages"] == plan
    reset = saved["configs"]["stacking, state reset"]
    assert (reset["stages"], reset["optimizer_state"]) == (plans[0], "reset")
    assert {saved["configs"][f"stacking {plan}"]["optimizer_state"] for plan in plans} == {"copy"}
    shallow = saved["configs"]["shallow only"]
    assert (shallow["stages"], shallow["num_layers"], shallow["steps"]) == (None, 1, 24)  # first stage's depth
    for name in names:  # an evaluation before the first step, then every 6 steps up to the 24th
        assert saved["eval_steps"][name] == [0, 6, 12, 18, 24] and len(saved["curves"][name]) == 5
    assert (tmp_path / "report" / "stacking.png").stat().st_size > 10_000
    table = (tmp_path / "report" / "stacking.md").read_text()
    assert "time to target" in table and all(plan in table for plan in plans)
    assert saved["verdict"] in table
    for name, cfg in saved["configs"].items():  # each run fine-tuned from its own final weights
        folder = Path(cfg["out_dir"])
        tuned = json.loads((folder / "finetune" / "test.json").read_text())
        assert saved["downstream"]["runs"][name]["test_accuracy"] == tuned["accuracy"]
        assert f"| {tuned['accuracy']:.4f} |" in table
        depth = int(cfg["stages"].split(",")[-1].split(":")[0]) if cfg["stages"] else cfg["num_layers"]
        best = json.loads((folder / "finetune" / "best" / "config.json").read_text())
        assert (best["num_hidden_layers"], best["hidden_size"]) == (depth, 64)


@pytest.mark.parametrize("shallow, expected", [(90.0, "not stacking, buy the time"), (150.0, "control takes 150 s"),
                                               (None, "control never reaches it")])
def test_verdict_says_whether_stacking_beats_the_shallow_control(shallow, expected):
    result = {"time_to_target_s": {"from scratch": 300.0, "stacking 2:5,4:5": 120.0, "stacking 2:2,4:8": None,
                                   "shallow only": shallow}}
    sentence = stacking.verdict(result)
    assert expected in sentence and "stacking 2:5,4:5" in sentence


def test_interrupted_invocation_keeps_its_runs_and_resume_finishes_the_rest(tmp_path, random_corpus,
                                                                             reference_kernels, monkeypatch):
    out = tmp_path / "report"
    real_pretrain, calls = stacking.pretrain, []

    def stopped_at_the_third_run(cfg):
        calls.append(cfg.out_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_pretrain(cfg)

    monkeypatch.setattr(stacking, "pretrain", stopped_at_the_third_run)
    with pytest.raises(KeyboardInterrupt):
        stacking.run("tiny", out=str(out), corpus=random_corpus, progress=False)
    partial = json.loads((out / "stacking.json").read_text())
    assert list(partial["configs"]) == ["from scratch", "stacking"]
    assert partial["pending"] == ["shallow only", "stacking, state reset"]
    assert "Not measured yet" in (out / "stacking.md").read_text()
    finished = {name: (Path(cfg["out_dir"]) / "log.jsonl").read_text() for name, cfg in partial["configs"].items()}
    tuned = {name: (Path(cfg["out_dir"]) / "downstream.json").read_text() for name, cfg in partial["configs"].items()}

    monkeypatch.setattr(stacking, "pretrain", real_pretrain)
    result = stacking.run("tiny", out=str(out), corpus=random_corpus, progress=False, resume=True)
    assert result["pending"] == [] and set(result["configs"]) == {"from scratch", "stacking", "shallow only",
                                                                   "stacking, state reset"}
    for name, cfg in partial["configs"].items():  # read back, not trained or fine-tuned again
        assert (Path(cfg["out_dir"]) / "log.jsonl").read_text() == finished[name]
        assert json.loads(tuned[name]) == result["downstream"]["runs"][name]
        assert [list(point) for point in result["curves"][name]] == partial["curves"][name]

    fresh = stacking.run("tiny", out=str(tmp_path / "fresh"), corpus=random_corpus, progress=False, downstream=False)
    assert fresh["final_loss"] == pytest.approx(result["final_loss"], abs=1e-6)  # the same runs as one invocation
