"""Fixtures of the training tests."""

import secrets

import numpy as np
import pytest
from tiny_runs import write_random_corpus

from bertforge.train.tokenizer import load_tokenizer


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bertforge-cache")


@pytest.fixture(autouse=True)
def _reference_kernels_and_cache(reference_kernels, session_cache, monkeypatch):
    """Training tests run on the plain-PyTorch ops, with a data cache of the session's own (shards are keyed by
    their corpus and settings, so sharing it between tests is safe)."""
    monkeypatch.setenv("BERTFORGE_CACHE", str(session_cache))


@pytest.fixture
def corpus(tmp_path):
    return write_random_corpus(tmp_path)
