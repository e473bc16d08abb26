"""A run folder is never overwritten by accident and never shared by two live runs."""

import json
import subprocess
import sys
import time

import pytest
from tiny_runs import tiny_config

from bertforge.train.pretrain import pretrain
from bertforge.train.run_folder import RunFolderError

HOLD_LOCK = """
import sys, time
from bertforge.train.run_folder import claim_run_folder
with claim_run_folder(sys.argv[1], resume=False, overwrite=False):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(corpus, tmp_path):
    pretrain(tiny_config(corpus, tmp_path, stop_after=2))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderError, match="already holds a run .*--resume true.*--overwrite true"):
        pretrain(tiny_config(corpus, tmp_path))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    pretrain(tiny_config(corpus, tmp_path, overwrite=True, stop_after=3))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"][0] == 0 and records[0]["step"] == 0
    assert sum(r["kind"] == "eval" and r["step"] == 0 for r in records) == 1, "two runs in one log"


def test_resume_without_a_checkpoint_is_an_error(corpus, tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        pretrain(tiny_config(corpus, tmp_path, resume=True))


def test_a_second_process_is_refused_and_a_dead_owners_lock_is_taken_over(corpus, tmp_path):
    out = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {owner.pid} on"):
            pretrain(tiny_config(corpus, out))
    finally:
        owner.kill()
        owner.wait()
    assert (out / ".lock").exists()  # stale: its owner is dead
    started = time.time()
    assert pretrain(tiny_config(corpus, out, stop_after=1))["step"] == 1
    assert time.time() - started < 120
