"""Fixtures of the training tests."""

import secrets

import numpy as np
import pytest

from bertforge.train.tokenizer import load_tokenizer


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()
