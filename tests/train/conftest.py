"""Fixtures of the training tests."""

import random
import secrets
import shutil

import numpy as np
import pytest
from tiny_runs import write_random_corpus

from bertforge.model import BertConfig, BertModel
from bertforge.train.corpus import minilm_checkpoint
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


GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = "the movie was a story of people and places with music and a long end".split()


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny random BERT in a Hugging Face folder, with MiniLM's tokenizer files beside it."""
    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(minilm_checkpoint() / name, folder / name)
    return str(folder)


@pytest.fixture
def sentiment_tsv(tmp_path):
    """SST-2-layout TSV: a sentence is "pos" when it holds a good word, "neg" when a bad one."""
    rng = random.Random()
    rows = ["sentence\tlabel"]
    for _ in range(160):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, rng.randint(3, 10)) + [rng.choice(GOOD if label == "pos" else BAD)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{label}")
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)
