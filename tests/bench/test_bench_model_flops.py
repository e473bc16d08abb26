"""The model benchmark's FLOP count against PyTorch's own FLOP counter, its batches' length profiles, and the
kernel benchmark's lookup of device peaks."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bertforge.bench._data import news_mlm_batch
from bertforge.bench.bench_model import useful_flops
from bertforge.model import BertConfig, BertForMaskedLM


def test_useful_flops_match_torch_flop_counter_on_full_rows(reference_kernels):
    config = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    model = BertForMaskedLM(BertConfig(**config)).train()
    # Full rows of a power-of-two length: the reference attention pads nothing, so every FLOP counted is useful.
    batch = news_mlm_batch(batch_size=4, max_length=64, lengths="full", seed=int(torch.randint(1000, ())))
    # The fused decoder + cross-entropy accumulates the weight's gradient with the in-place addmm_, which torch's
    # counter does not list; it counts as the addmm it is.
    def addmm_flop(out, a, b, *args, **kwargs):
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]

    addmm_flop._get_raw = True  # takes the tensors themselves
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as counter:
        model(**batch).loss.backward()
    counted = counter.get_total_flops()
    assert useful_flops(config, batch["attention_mask"], batch["labels"]) == counted


@pytest.mark.parametrize("lengths", ["corpus", "uniform", "full"])
def test_length_profiles(lengths):
    batch = news_mlm_batch(batch_size=16, max_length=48, lengths=lengths, seed=int(torch.randint(1000, ())))
    real = batch["attention_mask"].sum(1)
    assert int(real.max()) <= 48 and bool((batch["input_ids"][:, 0] == 101).all())
    if lengths == "full":
        assert bool((real == 48).all())
    if lengths == "uniform":
        assert int(real.min()) >= 16 and len(set(real.tolist())) > 4
    last = batch["input_ids"][torch.arange(16), real - 1]
    assert bool((last == 102).all()), "every row ends with [SEP]"


@pytest.mark.parametrize("name, peak", [("NVIDIA A100-SXM4-80GB", (312, 2039)), ("NVIDIA A100 80GB PCIe", (312, 1935)),
                                        ("NVIDIA H100 80GB HBM3", (989, 3350)), ("NVIDIA H200", (989, 4800)),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_device_peaks_are_found_by_name(name, peak):
    from bertforge.bench.bench_kernels import device_peak

    assert device_peak(name) == peak
