"""Tiny pre-training runs for the loop and pre-training tests: a random corpus and a config that runs in seconds."""

import random

from bertforge.train.pretrain import PretrainConfig

WORDS = ("the market said on monday that prices rose as the company reported new results while officials "
         "in the city planned more work for schools and hospitals after the long winter storm").split()


def write_random_corpus(tmp_path):
    """A small UTF-8 corpus: 60 documents of 6-12 random sentences, documents separated by blank lines."""
    rng = random.Random()
    documents = []
    for _ in range(60):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
                     for _ in range(rng.randint(6, 12))]
        documents.append(" ".join(sentences))
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(documents), encoding="utf-8")
    return str(path)


def tiny_config(corpus, out_dir, **overrides):
    values = dict(corpus=corpus, hidden_size=32, num_heads=2, intermediate_size=64, max_seq_length=32,
                  batch_size=4, stages="1:3,2:3", warmup_steps=2, lr=3e-3, eval_interval=2, eval_batches=2,
                  log_interval=1, checkpoint_interval=100, out_dir=str(out_dir), progress=False)
    values.update(overrides)
    return PretrainConfig(**values)


def final_parameters(summary):
    return {k: v.detach().clone() for k, v in summary["model"].state_dict().items()}
