"""Checkpoint files: verified on load (a flipped bit or a crafted file is refused by name, nothing runs, nothing is
overwritten), RNG state restored exactly, and half-written temporaries cleaned up on the next start."""

import hashlib
import pickle
import random

import numpy as np
import pytest
import torch
from tiny_runs import tiny_config

from bertforge.train.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from bertforge.train.pretrain import pretrain


class RunsCode:
    """Unpickling this calls a function: what a crafted checkpoint does to torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    body = pickle.dumps({"step": 1, "payload": RunsCode(marker)}, protocol=2)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"bertforge-checkpoint 2 sha256=%s\n" % hashlib.sha256(body).hexdigest().encode() + body)
    with pytest.raises(CheckpointError, match="checkpoint.pt is unreadable"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_flipped_bit_is_refused_and_the_resume_overwrites_nothing(corpus, tmp_path):
    pretrain(tiny_config(corpus, tmp_path, stop_after=2))
    path = tmp_path / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    position = random.randrange(data.index(b"\n") + 1, len(data))
    data[position] ^= 1 << random.randrange(8)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path} is corrupt"):
        pretrain(tiny_config(corpus, tmp_path, resume=True))
    assert path.read_bytes() == bytes(data)


def test_a_file_of_another_format_is_refused_by_name(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match="old.pt is not a bertforge checkpoint"):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)
    save_checkpoint({"rng": rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_half_written_temporaries_are_removed_on_the_next_start(corpus, tmp_path):
    pretrain(tiny_config(corpus, tmp_path, stop_after=2))
    stale = tmp_path / ".checkpoint.pt.x1y2z3.tmp"  # what a crash inside atomic_write leaves
    stale.write_bytes(b"partial")
    pretrain(tiny_config(corpus, tmp_path, resume=True, stop_after=3))
    assert not stale.exists()
