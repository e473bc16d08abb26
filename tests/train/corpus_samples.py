"""Small random corpora for the data tests: sentences of common words, documents of paragraphs."""

import numpy as np
import torch

from bertforge.train.mlm import IGNORE_INDEX
from bertforge.train.shards import TokenShards, build_shards

WORDS = ("the cat sat on a mat while dogs ran across green fields under bright blue skies and people talked "
         "about history science music art with friends in small towns near old rivers").split()


def random_sentence(rng, max_words=20) -> str:
    words = " ".join(rng.choice(WORDS, int(rng.integers(2, max_words + 1))))  # "A." alone reads as an initial
    return words[0].upper() + words[1:] + str(rng.choice([".", "!", "?"]))


def random_document(rng, max_sentences=12) -> list[list[str]]:
    """Paragraphs of sentences."""
    n = int(rng.integers(1, max_sentences + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(int(rng.integers(0, 3)), n - 1), replace=False))
    sentences = [random_sentence(rng) for _ in range(n)]
    return [list(p) for p in np.split(np.array(sentences, dtype=object), cuts)]


def as_text(document: list[list[str]]) -> str:
    return "\n".join(" ".join(p) for p in document)


def write_corpus(path, documents: list[str]):
    path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return path


def small_shards(tmp_path, rng, num_docs=60, **kwargs) -> TokenShards:
    docs = [as_text(random_document(rng)) for _ in range(num_docs)]
    write_corpus(tmp_path / "corpus.txt", docs)
    return build_shards(tmp_path / "corpus.txt", cache_dir=tmp_path / "cache", progress=False, **kwargs)


def original_ids(batch) -> torch.Tensor:
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def batches_equal(a, b) -> bool:
    """Same keys and values; the packing is compared field by field."""
    def fields(batch):
        packing = batch["packing"]
        return {**batch, "packing": packing.indices, "cu_seqlens": packing.cu_seqlens,
                "max_seqlen": torch.tensor(packing.max_seqlen)}

    return a.keys() == b.keys() and all(torch.equal(fields(a)[k], fields(b)[k]) for k in fields(a))
