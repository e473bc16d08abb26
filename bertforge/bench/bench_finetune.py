"""One fine-tuning step on CPU (forward, cross-entropy, backward, AdamW step): bertforge against transformers.

    pytest bertforge/bench/bench_finetune.py --benchmark-enable

Both: the real MiniLM checkpoint (6 layers, hidden 384, 12 heads) with the same freshly initialised 2-class head
(saved once, loaded by both), train mode, fp32, the same batch of 32 Rotten Tomatoes training snippets as
`bertforge finetune` batches them (length-sorted bucket, padded to its longest), the same fused AdamW and threads.
transformers runs `BertForSequenceClassification` with attn_implementation="sdpa". The suite's report prints each
case's time as a ratio to bertforge's, measured in the same run.
"""

import pytest
import torch

from bertforge.bench.steps import train_step
from bertforge.model import BertForSequenceClassification
from bertforge.train import corpus
from bertforge.train.classification_data import ClassificationBatches, rotten_tomatoes
from bertforge.train.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

GROUP = "finetune-step-cpu"
CASES = ["bertforge", "transformers-sdpa"]
ROUNDS = 5


pytestmark = pytest.mark.usefixtures("cpu_reference_kernels")


@pytest.fixture(scope="module")
def batch():
    batches = ClassificationBatches(rotten_tomatoes()["train"], load_tokenizer(), batch_size=32, seed=0)
    return next(batches)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, batch):
    """Initial weights shared by both cases; checks once that both libraries compute the same loss from them."""
    path = tmp_path_factory.mktemp("bench-finetune-weights")
    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(corpus.minilm_checkpoint(), num_labels=2).save_pretrained(path)
    with torch.no_grad():
        ours = build("bertforge", path, batch)
        theirs = build("transformers-sdpa", path, batch)
        losses = [m.eval()(**inputs).loss.item() for m, _, inputs in (ours, theirs)]
    assert abs(losses[0] - losses[1]) < 1e-4, f"not the same network: loss {losses}"
    return path


def build(case, weights_dir, batch):
    if case == "bertforge":
        model = BertForSequenceClassification.from_pretrained(weights_dir)
        inputs = batch  # with the packing built on the CPU by the collator
    else:
        model = transformers.BertForSequenceClassification.from_pretrained(weights_dir, attn_implementation="sdpa")
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=True), inputs


@pytest.mark.parametrize("case", CASES)
def test_finetune_step(benchmark, case, batch, weights_dir):
    model, optimizer, inputs = build(case, weights_dir, batch)
    benchmark.group = GROUP
    mask = batch["attention_mask"]
    benchmark.extra_info.update(provider=case, threads=torch.get_num_threads(), batch_shape=list(mask.shape),
                                real_tokens=int(mask.sum()))
    loss = benchmark.pedantic(train_step, args=(model, optimizer, inputs), rounds=ROUNDS, warmup_rounds=1)
    assert torch.isfinite(loss)
