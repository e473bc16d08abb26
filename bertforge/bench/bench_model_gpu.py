"""MLM pre-training steps of BERT-base and BERT-large on a GPU, in sequences/s: bertforge against transformers.

    pytest bertforge/bench/bench_model_gpu.py --benchmark-enable        (on a CUDA GPU; every case skips elsewhere)

Each case: forward under bf16 autocast, MLM loss, backward, fused AdamW step, on 32 full rows of news text
(sequence 128 and 512, 15% of tokens masked; pre-training packs documents to full rows). bertforge runs its Triton
kernels, the packed (unpadded) path and the sparse MLM head; transformers runs `BertForMaskedLM` with
attn_implementation="sdpa", eager and under torch.compile. The same initial weights for both. The anchor to beat:
NVIDIA DeepLearningExamples' BERT-large phase 1 (sequence 128), 580 sequences/s on one A100-80GB with AMP.
"""

import pytest
import torch

from bertforge.bench._data import news_mlm_batch
from bertforge.model import BertConfig, BertForMaskedLM

transformers = pytest.importorskip("transformers")

MODELS = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}
SEQ_LENS = (128, 512)
CASES = ["bertforge", "transformers-sdpa", "transformers-sdpa-compile"]
BATCH = 32
ROUNDS = 10


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One saved initial model per size, shared by every case of that size."""
    saved = {}

    def get(model):
        if model not in saved:
            path = tmp_path_factory.mktemp(f"bench-gpu-{model}")
            BertForMaskedLM(BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[model])) \
                .save_pretrained(path)
            saved[model] = path
        return saved[model]

    return get


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("model", MODELS)
def test_mlm_train_step_gpu(benchmark, cuda_device, weights, model, seq, case):
    batch = {k: v.to(cuda_device) for k, v in news_mlm_batch(BATCH, seq, seed=0, lengths="full").items()}
    if case == "bertforge":
        net = BertForMaskedLM.from_pretrained(weights(model))
    else:
        net = transformers.BertForMaskedLM.from_pretrained(weights(model), attn_implementation="sdpa")
    net = net.to(cuda_device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    if case.endswith("-compile"):
        net = torch.compile(net)

    def step():  # as bertforge's training loop: the forward under autocast, the backward outside it
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(**batch).loss
        loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
        return loss

    benchmark.group = f"mlm-train-step-gpu bert-{model} S={seq}"
    benchmark.extra_info.update(provider=case, batch=BATCH, seq=seq)
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3)
    assert torch.isfinite(loss)
    if benchmark.stats:
        benchmark.extra_info["sequences/s"] = BATCH / benchmark.stats.stats.median
