"""Fixtures of the benchmark tests."""

import random

import pytest


@pytest.fixture
def random_corpus(tmp_path, monkeypatch):
    """A small corpus of random news-like sentences (40 documents), with a data cache of the test's own."""
    monkeypatch.setenv("BERTFORGE_CACHE", str(tmp_path / "cache"))
    words = "the market said on monday that prices rose as the company reported new results".split()
    rng = random.Random()
    text = "\n\n".join(" ".join(" ".join(rng.choice(words) for _ in range(10)).capitalize() + "." for _ in range(8))
                       for _ in range(40))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)
