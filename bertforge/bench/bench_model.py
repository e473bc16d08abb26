"""One full MLM training step on CPU (forward, loss, backward, AdamW step): bertforge against transformers.

    pytest bertforge/bench/bench_model.py --benchmark-enable

Both models: hidden 128, 8 layers, 2 heads, FFN 512, vocab 30522, 512 positions, dropout 0.1, train mode,
fp32, the same initial weights (bertforge's init, saved and loaded by both), the same batch
(`news_mlm_batch`, 15% of real tokens masked, padded to the batch max) in three length profiles: 32 real news
paragraphs as they come (up to 128 tokens), 32 rows of uniform random lengths in [42, 128], and 32 full 128-token
rows, where padding saves nothing; the same AdamW (fused), the same threads. transformers runs `BertForMaskedLM` with
attn_implementation="sdpa", its fastest CPU attention. Cases with "-compile" wrap the model in
torch.compile (they run only with --benchmark-enable: compiling takes minutes). Each case names itself in
extra_info["provider"]; the suite's report prints every case's time as a ratio to bertforge's, measured in
the same run. CPU cases run on bertforge's plain-PyTorch kernels (what bertforge runs on a CPU).
"bertforge-unfused-head" is bertforge with the MLM decoder and cross-entropy as two ops (the logits kept between
them) instead of `linear_cross_entropy`: what the fused op buys, in the same run.
extra_info["GFLOP/s"] counts the work bertforge does (real tokens only, the MLM head at the labelled positions;
backward = 2x forward) for every provider, so it is comparable across them; a torch.mm case measures the CPU's fp32
matmul ceiling in the same run, and another the rate of the full-rows step's own matmuls run alone.

On a shared machine, OpenMP threads stall whenever another process holds a core; pin the threads
(`OMP_NUM_THREADS=1`) for stable ratios.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from bertforge.bench._data import news_mlm_batch
from bertforge.bench.steps import train_step
from bertforge.model import IGNORE_INDEX, BertConfig, BertForMaskedLM

transformers = pytest.importorskip("transformers")

GROUP = "mlm-train-step-cpu"
CASES = ["bertforge", "bertforge-unfused-head", "transformers-sdpa", "bertforge-compile", "transformers-sdpa-compile"]
LENGTH_PROFILES = ["corpus", "uniform", "full"]
CEILING_N = 2048
CONFIG = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=8, num_attention_heads=2, intermediate_size=512,
              max_position_embeddings=512)
ROUNDS = 5


pytestmark = pytest.mark.usefixtures("cpu_reference_kernels")


@pytest.fixture(scope="module", params=LENGTH_PROFILES)
def batch(request):
    return request.param, news_mlm_batch(batch_size=32, max_length=128, mask_fraction=0.15, seed=0,
                                         lengths=request.param)


def useful_flops(config: dict, attention_mask, labels) -> int:
    """FLOPs of one training step on the real tokens: per layer 2 (4 h^2 + 2 h ffn) per token for the projections
    and 4 h sum_b L_b^2 for attention, the MLM head (transform + decoder) at the labelled positions; x3 for the
    backward."""
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    lengths = attention_mask.sum(1).long()
    per_layer = 2 * (4 * h * h + 2 * h * ffn) * int(lengths.sum()) + 4 * h * int((lengths ** 2).sum())
    head = 2 * (h * h + h * vocab) * int((labels != IGNORE_INDEX).sum())
    return 3 * (config["num_hidden_layers"] * per_layer + head)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, batch):
    """Initial weights shared by every case; checks once that both libraries compute the same loss from them."""
    _, batch = batch
    path = tmp_path_factory.mktemp("bench-mlm-weights")
    BertForMaskedLM(BertConfig(**CONFIG)).save_pretrained(path)
    with torch.no_grad():
        ours = BertForMaskedLM.from_pretrained(path).eval()(**batch).loss
        theirs = transformers.BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa").eval()(**batch).loss
    assert abs(ours.item() - theirs.item()) < 1e-4, f"not the same network: loss {ours.item()} vs {theirs.item()}"
    return path


def unfused_mlm_loss(head, h, decoder_weight, targets):
    """The MLM loss as separate ops, the logits kept between them: what `linear_cross_entropy` replaces."""
    return F.cross_entropy(head(h, decoder_weight), targets)


def build(case, weights_dir):
    if case.startswith("bertforge"):
        model = BertForMaskedLM.from_pretrained(weights_dir)
        if case == "bertforge-unfused-head":
            model.head.loss = functools.partial(unfused_mlm_loss, model.head)
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
    profile, batch = batch
    model, optimizer = build(case, weights_dir)
    mask = batch["attention_mask"]
    benchmark.group = f"{GROUP} {profile} lengths"
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    benchmark.extra_info.update(provider=case, threads=torch.get_num_threads(), batch_shape=list(mask.shape),
                                real_tokens=int(mask.sum()), labelled_tokens=labelled)
    warmup = 2 if case.endswith("-compile") else 1  # the first steps compile and allocate AdamW state
    loss = benchmark.pedantic(train_step, args=(model, optimizer, batch), rounds=ROUNDS, warmup_rounds=warmup)
    assert torch.isfinite(loss)
    if benchmark.stats:  # None under --benchmark-disable
        flops = useful_flops(CONFIG, mask, batch["labels"])
        benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9


def step_matmuls(config: dict, batch_size: int, seq_len: int, labelled: int):
    """The matmuls of one training step on full rows, with fresh operands of their shapes: per linear layer the
    forward x @ W.T, the input's gradient g @ W and the weight's g.T @ x; per attention product the batched
    forward and its two gradients; returns (callables, FLOPs)."""
    h, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, tokens = config["num_attention_heads"], batch_size * seq_len

    def linear(rows, inputs, outputs):
        x, w, g = torch.randn(rows, inputs), torch.randn(outputs, inputs), torch.randn(rows, outputs)
        return [lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x], 6 * rows * inputs * outputs

    def batched(m, k, n):
        a, b, g = (torch.randn(batch_size * heads, *shape) for shape in ((m, k), (k, n), (m, n)))
        return [lambda: a @ b, lambda: g @ b.transpose(1, 2), lambda: a.transpose(1, 2) @ g], 6 * a.shape[0] * m * k * n

    d = h // heads
    layer = [linear(tokens, h, 3 * h), linear(tokens, h, h), linear(tokens, h, ffn), linear(tokens, ffn, h),
             batched(seq_len, d, seq_len), batched(seq_len, seq_len, d)]
    head = [linear(labelled, h, h), linear(labelled, h, vocab)]
    calls = [f for fns, _ in layer for f in fns] * config["num_hidden_layers"] + [f for fns, _ in head for f in fns]
    flops = config["num_hidden_layers"] * sum(f for _, f in layer) + sum(f for _, f in head)
    return calls, flops


def test_fp32_matmuls_at_the_step_shapes(benchmark, batch):
    """Every matmul of one full-rows step alone, back to back: what the step would reach if nothing but its
    matmuls cost time (its small inner dimensions run below the square matmul's rate)."""
    profile, batch = batch
    if profile != "full":
        pytest.skip("measured on full rows, where every matmul of the step has one shape per layer")
    rows, seq_len = batch["input_ids"].shape
    calls, flops = step_matmuls(CONFIG, rows, seq_len, int((batch["labels"] != IGNORE_INDEX).sum()))
    assert flops == useful_flops(CONFIG, batch["attention_mask"], batch["labels"])
    benchmark.group = "fp32-matmul-ceiling-cpu"
    benchmark.extra_info.update(provider="the step's matmuls alone", threads=torch.get_num_threads())
    benchmark.pedantic(lambda: [call() for call in calls], rounds=ROUNDS, warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["GFLOP/s"] = flops / benchmark.stats.stats.median / 1e9


def test_fp32_matmul_ceiling(benchmark):
    """The CPU's fp32 matmul rate (a square torch.mm), the ceiling the full-rows step is measured against."""
    a, b = torch.randn(CEILING_N, CEILING_N), torch.randn(CEILING_N, CEILING_N)
    benchmark.group = "fp32-matmul-ceiling-cpu"
    benchmark.extra_info.update(provider=f"torch.mm {CEILING_N}", threads=torch.get_num_threads(), ceiling=True)
    benchmark.pedantic(torch.mm, args=(a, b), rounds=ROUNDS, warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["GFLOP/s"] = 2 * CEILING_N ** 3 / benchmark.stats.stats.median / 1e9
