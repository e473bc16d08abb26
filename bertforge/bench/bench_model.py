"""One full MLM training step on CPU (forward, loss, backward, AdamW step): bertforge against transformers.

    pytest bertforge/bench/bench_model.py --benchmark-enable

Both models: hidden 128, 8 layers, 2 heads, FFN 512, vocab 30522, 512 positions, dropout 0.1, train mode,
fp32, the same initial weights (bertforge's init, saved and loaded by both), the same batch
(`news_mlm_batch`: 32 real news paragraphs, max length 128, 15% of real tokens masked, padded to the batch
max), the same AdamW (fused), the same threads. transformers runs `BertForMaskedLM` with
attn_implementation="sdpa", its fastest CPU attention. Cases with "-compile" wrap the model in
torch.compile (they run only with --benchmark-enable: compiling takes minutes). Each case names itself in
extra_info["provider"]; the suite's report prints every case's time as a ratio to bertforge's, measured in
the same run. CPU cases run on bertforge's plain-PyTorch kernels (what bertforge runs on a CPU).

On a shared machine, OpenMP threads stall whenever another process holds a core; pin the threads
(`OMP_NUM_THREADS=1`) for stable ratios.
"""

import pytest
import torch

from bertforge.bench._data import news_mlm_batch
from bertforge.bench.steps import train_step
from bertforge.model import IGNORE_INDEX, BertConfig, BertForMaskedLM

transformers = pytest.importorskip("transformers")

GROUP = "mlm-train-step-cpu"
CASES = ["bertforge", "transformers-sdpa", "bertforge-compile", "transformers-sdpa-compile"]
CONFIG = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=8, num_attention_heads=2, intermediate_size=512,
              max_position_embeddings=512)
ROUNDS = 5


pytestmark = pytest.mark.usefixtures("cpu_reference_kernels")


@pytest.fixture(scope="module")
def batch():
    return news_mlm_batch(batch_size=32, max_length=128, mask_fraction=0.15, seed=0)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, batch):
    """Initial weights shared by every case; checks once that both libraries compute the same loss from them."""
    path = tmp_path_factory.mktemp("bench-mlm-weights")
    BertForMaskedLM(BertConfig(**CONFIG)).save_pretrained(path)
    with torch.no_grad():
        ours = BertForMaskedLM.from_pretrained(path).eval()(**batch).loss
        theirs = transformers.BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa").eval()(**batch).loss
    assert abs(ours.item() - theirs.item()) < 1e-4, f"not the same network: loss {ours.item()} vs {theirs.item()}"
    return path


def build(case, weights_dir):
    if case.startswith("bertforge"):
        model = BertForMaskedLM.from_pretrained(weights_dir)
    else:
        model = transformers.BertForMaskedLM.from_pretrained(weights_dir, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    if case.endswith("-compile"):
        model = torch.compile(model)
    return model, optimizer


@pytest.mark.parametrize("case", CASES)
def test_mlm_train_step(benchmark, case, batch, weights_dir):
    if case.endswith("-compile") and benchmark.disabled:
        pytest.skip("torch.compile cases compile for minutes; they run with --benchmark-enable")
    model, optimizer = build(case, weights_dir)
    mask = batch["attention_mask"]
    benchmark.group = GROUP
    benchmark.extra_info.update(provider=case, threads=torch.get_num_threads(), batch_shape=list(mask.shape),
                                real_tokens=int(mask.sum()), labelled_tokens=int((batch["labels"] != IGNORE_INDEX).sum()))
    warmup = 2 if case.endswith("-compile") else 1  # the first steps compile and allocate AdamW state
    loss = benchmark.pedantic(train_step, args=(model, optimizer, batch), rounds=ROUNDS, warmup_rounds=warmup)
    assert torch.isfinite(loss)
