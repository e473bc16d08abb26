"""The training loop with stacking: exact resume across growth, bad input, atomic checkpoints, DDP with gloo."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import final_parameters, tiny_config

import bertforge.train.pretrain as pretrain_module
from bertforge.model.growth import depth
from bertforge.train import corpus as corpus_module
from bertforge.train import files as files_module
from bertforge.train.checkpoint import CheckpointError, load_checkpoint
from bertforge.train.cli import main as cli_main
from bertforge.train.pretrain import parse_stages, pretrain
from bertforge.train.text import CorpusError


@pytest.mark.parametrize("stop_after", [3, 4], ids=["before-stacking", "after-stacking"])
def test_resume_across_stacking_is_bit_identical(corpus, tmp_path, stop_after):
    uninterrupted = final_parameters(pretrain(tiny_config(corpus, tmp_path / "a")))
    first = pretrain(tiny_config(corpus, tmp_path / "b", stop_after=stop_after))
    assert first["step"] == stop_after
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["model_config"]["num_hidden_layers"] == (1 if stop_after == 3 else 2)
    resumed = final_parameters(pretrain(tiny_config(corpus, tmp_path / "b", resume=True)))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resuming"


def test_stacking_run_grows_and_logs(corpus, tmp_path):
    summary = pretrain(tiny_config(corpus, tmp_path, stages="1:2,2:2,4:3"))
    assert depth(summary["model"]) == 4 and summary["step"] == 7
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["depth"] for r in records if r["kind"] == "stack"] == [2, 4]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 7
    assert all(r["heldout_loss"] > 0 for r in evals)
    assert (tmp_path / "tensorboard").is_dir()


@pytest.mark.parametrize("stop_after", [2, 4], ids=["before-the-draw", "after-the-draw"])
def test_earlybird_pretraining_prunes_at_the_draw_and_resumes_bit_identical(corpus, tmp_path, stop_after):
    settings = dict(stages=None, num_layers=2, hidden_size=64, num_heads=4, intermediate_size=40, steps=6,
                    earlybird=True, draw_step=3, record_interval=1)
    summary = pretrain(tiny_config(corpus, tmp_path / "a", **settings))
    config = summary["model"].config
    assert config.heads_per_layer == [3, 3] and sum(config.intermediate_size_per_layer) == 48  # 1 of 4, 40% of 80
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "prune"] == [3]
    assert json.loads((tmp_path / "a" / "ticket.json").read_text())["heads_per_layer"] == [3, 3]
    assert all(r["heldout_loss"] > 0 for r in records if r["kind"] == "eval")
    uninterrupted = final_parameters(summary)
    pretrain(tiny_config(corpus, tmp_path / "b", stop_after=stop_after, **settings))
    resumed = final_parameters(pretrain(tiny_config(corpus, tmp_path / "b", resume=True, **settings)))
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), f"{name} differs after resuming"


@pytest.mark.parametrize(
    "spec, message",
    [("3:10,5:10", "does not double"), ("3-10", "depth:steps"), ("0:10", ">= 1"), ("2:10,4:x", "depth:steps")],
)
def test_bad_stage_plans(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_stages(spec)


def test_resume_from_another_config_is_refused(corpus, tmp_path):
    pretrain(tiny_config(corpus, tmp_path, stop_after=2))
    with pytest.raises(CheckpointError, match="hidden_size"):
        pretrain(tiny_config(corpus, tmp_path, hidden_size=64, resume=True))


def test_resume_with_a_changed_vocabulary_is_refused(corpus, tmp_path):
    """Same config, same tokenizer path, but two ids swapped in the file: the model would fit, the ids would lie."""
    words = (corpus_module.minilm_checkpoint() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    pretrain(tiny_config(corpus, tmp_path / "run", tokenizer=str(vocab), stop_after=2))
    the, of = words.index("the"), words.index("of")
    words[the], words[of] = words[of], words[the]
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="vocabulary"):
        pretrain(tiny_config(corpus, tmp_path / "run", tokenizer=str(vocab), resume=True))


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="corpus path does not exist: .*nothing.txt"):
        pretrain(tiny_config(str(tmp_path / "nothing.txt"), tmp_path / "out"))
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="corpus is empty: empty.txt holds no text"):
        pretrain(tiny_config(str(tmp_path / "empty.txt"), tmp_path / "out"))


def test_disk_full_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    pretrain(tiny_config(corpus, tmp_path, stop_after=2))
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()

    def full_disk(fd):  # the data did not all reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match="No space left.*previous checkpoint .* is intact"):
        pretrain(tiny_config(corpus, tmp_path, resume=True, stop_after=4))
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_runs_and_rejects_bad_values(corpus, tmp_path, capsys):
    cli_main(["pretrain", "--corpus", corpus, "--hidden_size", "32", "--num_heads", "2", "--intermediate_size",
              "64", "--max_seq_length", "32", "--batch_size", "4", "--stages", "none", "--num_layers", "1",
              "--steps", "2", "--warmup_steps", "1", "--eval_batches", "1", "--out_dir", str(tmp_path / "cli"), "--progress", "false"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    with pytest.raises(SystemExit, match="does not double"):
        cli_main(["pretrain", "--stages", "3:10,5:10"])
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--steps", "many"])


DDP_SCRIPT = """
import os, sys, torch
from bertforge.train.text import CorpusError
from bertforge.train.pretrain import PretrainConfig, pretrain
cfg = PretrainConfig(**__import__("json").loads(sys.argv[1]))
summary = pretrain(cfg)
rank = int(os.environ["RANK"])
torch.save(summary["model"].module.state_dict(), os.path.join(sys.argv[2], f"rank{rank}.pt"))
"""


@pytest.mark.parametrize("method", ["stacking", "earlybird"])
def test_ddp_two_cpu_processes_stack_or_prune_and_stay_in_sync(corpus, tmp_path, method):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = dict(corpus=corpus, hidden_size=32, num_heads=2, intermediate_size=64, max_seq_length=32, batch_size=2,
               stages="1:2,2:2", eval_interval=2, eval_batches=1, out_dir=str(tmp_path / "ddp"), progress=False)
    if method == "earlybird":  # the ticket drawn after step 2 keeps one head of two per layer
        cfg.update(stages=None, num_layers=2, steps=4, earlybird=True, draw_step=2, record_interval=1)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "BERTFORGE_KERNELS": "reference", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(script), json.dumps(cfg), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sum(".layers." in k for k in rank0) == 2 * sum(".layers.0." in k for k in rank0), "not 2 layers"
    if method == "earlybird":
        assert rank0["bert.encoder.layers.1.attention.qkv.weight"].shape == (3 * 16, 32), "not pruned"
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
    checkpoint = load_checkpoint(Path(cfg["out_dir"]) / "checkpoint.pt")
    assert len(checkpoint["per_rank"]) == 2 and checkpoint["step"] == 4


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the corpus is touched: validation must come before any work."""
    def tokenize(*args, **kwargs):
        raise AssertionError("the corpus was tokenized before the configuration was checked")

    monkeypatch.setattr(pretrain_module, "build_shards", tokenize)


def test_every_bad_value_is_reported_before_any_work(no_work, tmp_path):
    flags = {"grad_clip": "-1", "eval_batches": "0", "lr": "0", "warmup_steps": "-5", "eval_interval": "-2",
             "stop_after": "0", "hidden_size": "100", "num_heads": "3", "steps": "10", "num_layers": "3",
             "checkpoint_interval": "-1", "dropout": "1.5"}
    with pytest.raises(SystemExit) as error:
        cli_main(["pretrain", "--out_dir", str(tmp_path)] + [x for k, v in flags.items() for x in (f"--{k}", v)])
    lines = str(error.value.code).splitlines()
    assert lines[0] == "bertforge: bad configuration:"
    for expected in ["grad_clip must be >= 0", "eval_batches must be >= 1", "lr must be > 0",
                     "warmup_steps must be >= 0", "eval_interval must be >= 0", "stop_after must be >= 1",
                     "num_layers = 3 contradicts the stage plan", "steps = 10 contradicts the stage plan",
                     "checkpoint_interval must be >= 1"]:
        assert sum(expected in line for line in lines) == 1, f"no line says {expected!r}: {lines}"
    without_plan = ["pretrain", "--stages", "none", "--hidden_size", "100", "--num_heads", "3"]
    with pytest.raises(SystemExit, match="hidden_size \\(100\\) must be a multiple of num_attention_heads"):
        cli_main(without_plan)
    with pytest.raises(SystemExit, match="dropout_prob must be in \\[0, 1\\), got 1.5"):
        cli_main(["pretrain", "--dropout", "1.5"])


def test_bad_earlybird_values_are_reported_before_any_work(no_work, tmp_path):
    with pytest.raises(SystemExit) as error:
        cli_main(["pretrain", "--earlybird", "true", "--stages", "2:10,4:10", "--head_ratio", "1", "--window", "1",
                  "--draw_step", "20", "--out_dir", str(tmp_path)])
    message = str(error.value.code)
    for expected in ["head_ratio must be in [0, 1)", "window must be >= 2", "give --stages none",
                     "draw_step must be a step before the last (20), got 20"]:
        assert expected in message, message


def test_help_lists_the_ticket_search_after_the_commands_own_fields(capsys):
    for command in ("pretrain", "earlybird"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        own, ticket = capsys.readouterr().out.split("\noptions:")[1].split("EarlyBERT ticket search:")
        assert "--head_ratio" in ticket and "--draw_step" in ticket and "--head_ratio" not in own
        assert "--out_dir" in own and "--steps" in own


def test_json_config_values_are_type_checked(no_work, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"resume": "false", "steps": 5.5, "lr": "1e-3", "stages": None, "bogus": 1}))
    with pytest.raises(SystemExit) as error:
        cli_main(["pretrain", "--config", str(path)])
    message = str(error.value.code)
    for expected in ['resume must be bool, got "false"', "steps must be int or null, got 5.5",
                     'lr must be float, got "1e-3"', "unknown field 'bogus'"]:
        assert expected in message, message
    assert "stages" not in message  # null is a valid stage plan (none)
    path.write_text("{not json")
    with pytest.raises(SystemExit, match=f"cannot read config file {path}"):
        cli_main(["pretrain", "--config", str(path)])


def test_a_run_that_would_use_no_plan_steps_trains_what_it_says(corpus, tmp_path):
    summary = pretrain(tiny_config(corpus, tmp_path, stages=None, num_layers=2, steps=3))
    assert summary["step"] == 3 and depth(summary["model"]) == 2


HANGING_RANK_SCRIPT = """
import sys, time
import bertforge.train.pretrain as pretrain_module
from bertforge.train.cli import main

class Hang:  # rank 1 stops answering at step 3
    def on_step_start(self, trainer):
        if trainer.rank == 1 and trainer.step == 2:
            time.sleep(600)

build = pretrain_module.build_trainer
pretrain_module.build_trainer = lambda cfg: (lambda t: (t.hooks.append(Hang()), t)[1])(build(cfg))
main(["pretrain", "--config", sys.argv[1]])
"""


def test_a_hung_rank_fails_the_job_after_the_timeout(corpus, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "run.json"
    config.write_text(json.dumps(dict(
        corpus=corpus, hidden_size=32, num_heads=2, intermediate_size=64, max_seq_length=32, batch_size=2,
        stages=None, num_layers=1, steps=6, eval_interval=0, out_dir=str(tmp_path / "ddp"), progress=False,
        dist_timeout=5)))
    env = {**os.environ, "BERTFORGE_KERNELS": "reference", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    ranks = [subprocess.Popen([sys.executable, "-c", HANGING_RANK_SCRIPT, str(config)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _, errors = ranks[0].communicate(timeout=120)  # without a timeout rank 0 would wait for ever
    finally:
        for process in ranks:
            process.kill()
    assert ranks[0].returncode == 1
    assert "bertforge pretrain: rank 0: step 3: waited more than 5 s for another rank" in errors.splitlines()[-1]


def test_convert_writes_a_folder_transformers_loads_with_the_same_outputs(corpus, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    summary = pretrain(tiny_config(corpus, tmp_path / "run", stop_after=4))  # stacked to 2 layers at step 3
    out = tmp_path / "hf"
    cli_main(["convert", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out_dir", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"out_dir": str(out), "step": 4,
                                                                          "layers": 2}
    ours = summary["model"].eval()
    theirs = transformers.BertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(5, ours.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = ours(ids, mask).logits
        got = theirs(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit, match="already holds a model"):
        cli_main(["convert", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out_dir", str(out)])
    with pytest.raises(SystemExit, match="--checkpoint is required"):
        cli_main(["convert", "--out_dir", str(out)])
