"""The training loop's guarantees: a non-finite step is never applied or checkpointed, SIGINT/SIGTERM finish the
step and save a checkpoint that resumes bit for bit, and a run crosses epochs and resumes exactly."""

import json
import math
import os
import signal

import pytest
import torch
from tiny_runs import final_parameters, tiny_config

import bertforge.train.pretrain as pretrain_module
from bertforge.train.checkpoint import load_checkpoint
from bertforge.train.mlm import MLMBatches
from bertforge.train.pretrain import pretrain
from bertforge.train.shards import build_shards


def log_records(out_dir, kind):
    return [r for r in map(json.loads, (out_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def poison_gradient_at(monkeypatch, steps: set[int]):
    """Make one weight's gradient NaN during the given optimizer steps (1-based, as logged); the loss stays finite."""
    build = pretrain_module.build_trainer

    def build_poisoned(cfg):
        trainer = build(cfg)
        weight = trainer.model.bert.embeddings.word_embeddings.weight
        weight.register_hook(lambda g: g * math.nan if trainer.step + 1 in steps else g)
        return trainer

    monkeypatch.setattr(pretrain_module, "build_trainer", build_poisoned)


def test_a_non_finite_gradient_is_skipped_not_applied(corpus, tmp_path, monkeypatch):
    poison_gradient_at(monkeypatch, {3})
    summary = pretrain(tiny_config(corpus, tmp_path, stages=None, num_layers=1, steps=5, checkpoint_interval=2))
    assert summary["skipped_steps"] == 1
    skips = log_records(tmp_path, "skip")
    assert [r["step"] for r in skips] == [3]
    assert math.isfinite(skips[0]["loss"])  # the loss alone would not have caught it
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["skipped_steps"] == 1 and saved["step"] == 5
    for name, tensor in list(saved["model"].items()) + [("moment", s["exp_avg"]) for s in
                                                         saved["optimizer"]["state"].values()]:
        assert torch.isfinite(tensor).all(), f"{name} holds non-finite values"
    assert log_records(tmp_path, "train")[-1]["skipped_steps"] == 1


def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    poison_gradient_at(monkeypatch, set(range(3, 100)))
    cfg = dict(stages=None, num_layers=1, steps=20, checkpoint_interval=2, max_skipped_in_a_row=3)
    with pytest.raises(FloatingPointError, match=r"steps 3 to 6: .* 4 times in a row.*checkpoint\.pt at step 4, holds only finite"):
        pretrain(tiny_config(corpus, tmp_path, **cfg))
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 4 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_run_of_non_finite_steps_is_counted_across_a_resume(corpus, tmp_path, monkeypatch):
    poison_gradient_at(monkeypatch, set(range(3, 100)))
    cfg = dict(stages=None, num_layers=1, steps=20, checkpoint_interval=2, max_skipped_in_a_row=3)
    pretrain(tiny_config(corpus, tmp_path, stop_after=4, **cfg))  # stops after steps 3 and 4 were skipped
    with pytest.raises(FloatingPointError, match=r"steps 3 to 6: .* 4 times in a row"):
        pretrain(tiny_config(corpus, tmp_path, resume=True, **cfg))


class SignalAt(MLMBatches):
    """Batches that send a signal to this process while the loop draws batch number `at` (mid-step with
    grad_accum 2 and an odd `at`)."""

    at, signum, drawn = None, None, 0

    def __next__(self):
        SignalAt.drawn += 1
        if SignalAt.drawn == SignalAt.at:
            os.kill(os.getpid(), SignalAt.signum)
        return super().__next__()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_step_saves_after_the_step_and_resumes_bit_for_bit(corpus, tmp_path, monkeypatch, signum):
    cfg = dict(grad_accum=2, checkpoint_interval=100)
    uninterrupted = final_parameters(pretrain(tiny_config(corpus, tmp_path / "a", **cfg)))
    monkeypatch.setattr(pretrain_module, "MLMBatches", SignalAt)
    SignalAt.at, SignalAt.signum, SignalAt.drawn = 7, signum, 0  # the 1st micro-batch of step 4
    expected = (KeyboardInterrupt,) if signum == signal.SIGINT else (SystemExit,)
    with pytest.raises(expected) as stopped:
        pretrain(tiny_config(corpus, tmp_path / "b", **cfg))
    if signum == signal.SIGTERM:
        assert stopped.value.code == 128 + signal.SIGTERM
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["step"] == 4  # the step in progress was finished, then saved
    assert saved["per_rank"][0]["data"]["step"] == 8  # and the data position matches it: 4 steps x 2 micro-batches
    assert log_records(tmp_path / "b", "stop")[0]["signal"] == signal.Signals(signum).name
    monkeypatch.setattr(pretrain_module, "MLMBatches", MLMBatches)
    resumed = final_parameters(pretrain(tiny_config(corpus, tmp_path / "b", resume=True, **cfg)))
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs after the interrupted run resumed"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the loop put the handlers back


def test_resume_across_an_epoch_boundary_is_bit_identical(corpus, tmp_path):
    epoch = MLMBatches(build_shards(corpus, progress=False), batch_size=4, max_seq_length=32).batches_per_epoch
    cfg = dict(stages=None, num_layers=1, steps=epoch + 3, eval_interval=0, checkpoint_interval=100)
    uninterrupted = final_parameters(pretrain(tiny_config(corpus, tmp_path / "a", **cfg)))
    pretrain(tiny_config(corpus, tmp_path / "b", stop_after=epoch + 1, **cfg))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["per_rank"][0]["data"] \
        | {"epoch": 1, "step": 1} == load_checkpoint(tmp_path / "b" / "checkpoint.pt")["per_rank"][0]["data"]
    resumed = final_parameters(pretrain(tiny_config(corpus, tmp_path / "b", resume=True, **cfg)))
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resuming across the epoch"
