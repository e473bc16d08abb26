"""Test settings shared by every test module.

TRITON_INTERPRET=1 must be set before the kernel modules are imported: it makes Triton kernels run on CPU
tensors through Triton's interpreter, which is how the kernel tests run without a GPU.
"""

import os
import random
import shutil

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Relative error norm ||actual - expected|| / ||expected|| allowed against a float64 reference, per input dtype.
# fp32 is what tf32 dots give on a GPU; fp16 / bf16 what their 10- and 7-bit mantissas give. Do not loosen.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_close_rel(actual, expected, dtype, what=""):
    """Fail on NaN/inf (unwritten, poisoned output) or on a relative error norm above the dtype's tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element was not written?)"
    err = relative_error(actual, expected)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e} for {dtype}"


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run bertforge through the plain-PyTorch ops (fast on CPU), e.g. for model and training tests."""
    monkeypatch.setenv("BERTFORGE_KERNELS", "reference")


@pytest.fixture(autouse=True)
def fresh_seed():
    """Fresh random inputs every run; the seed is printed, and BERTFORGE_TEST_SEED=<seed> replays a failure."""
    import random

    replay = os.environ.get("BERTFORGE_TEST_SEED")
    seed = int(replay) if replay else random.randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


# A tiny classification task for the fine-tuning tests (training and benchmarks).
GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]
FILLER = "the movie was a story of people and places with music and a long end".split()


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny random BERT in a Hugging Face folder, with MiniLM's tokenizer files beside it."""
    from bertforge.model import BertConfig, BertModel
    from bertforge.train.corpus import minilm_checkpoint

    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt"):
        shutil.copy(minilm_checkpoint() / name, folder / name)
    return str(folder)


@pytest.fixture
def sentiment_tsv(tmp_path):
    """SST-2-layout TSV of 160 rows: a sentence is "pos" when it holds a good word, "neg" when a bad one."""
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
