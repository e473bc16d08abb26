"""EarlyBERT's slimming coefficients against transformers with the scales folded into its weights, the ticket against the
official quantile rule, the early-bird detector, and physical pruning against the masked model."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bert_inputs import ragged_batch, random_lengths, tiny_config

from bertforge.model import BertForSequenceClassification, BertModel, MultiExitBert
from bertforge.model.growth import stack
from bertforge.model.slimming import (
    EarlyBird,
    TicketError,
    coefficients,
    draw_ticket,
    enable_slimming,
    l1_penalty,
    prune,
)


def inputs(config, batch=4, seqlen=11):
    return ragged_batch(config.vocab_size, random_lengths(batch, seqlen), seqlen)


def randomise_scales(model):
    with torch.no_grad():
        for layer in model.bert.encoder.layers if hasattr(model, "bert") else model.encoder.layers:
            layer.attention.head_scale.uniform_(-1.5, 1.5)
            layer.intermediate.neuron_scale.uniform_(-1.5, 1.5)


def test_a_plain_checkpoint_loads_with_scales_of_one_and_computes_the_same(tmp_path):
    plain = BertModel(tiny_config()).eval()
    plain.save_pretrained(tmp_path)
    assert "slimming" not in (tmp_path / "config.json").read_text()  # transformers' own config.json, unchanged
    slim = BertModel.from_pretrained(tmp_path, slimming=True).eval()
    assert all(torch.equal(c, torch.ones_like(c)) for group in coefficients(slim) for c in group)
    ids, mask, types = inputs(plain.config)
    with torch.no_grad():
        torch.testing.assert_close(slim(ids, mask, types).last_hidden_state, plain(ids, mask, types).last_hidden_state)


@pytest.mark.parametrize("padded", [True, False])
def test_scales_equal_transformers_with_the_scales_folded_into_the_output_projections(tmp_path, padded):
    """A head's scale multiplies its columns of the attention output projection, a neuron's its column of the FFN
    output projection (transformers 5 no longer applies head_mask, so both are folded into the weights)."""
    transformers = pytest.importorskip("transformers")
    config = tiny_config(num_hidden_layers=3, num_attention_heads=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    ours = enable_slimming(BertModel(config)).eval()
    randomise_scales(ours)
    head_scales, neuron_scales = coefficients(ours)
    plain = BertModel(dataclasses.replace(config, slimming=False))
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.endswith("_scale")})
    with torch.no_grad():
        for layer, heads, neurons in zip(plain.encoder.layers, head_scales, neuron_scales):
            layer.attention.proj.weight.mul_(heads.repeat_interleave(config.head_dim))
            layer.output.weight.mul_(neurons)
    plain.save_pretrained(tmp_path)
    theirs = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids, mask, types = inputs(config)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        expected = theirs(ids, mask, types).last_hidden_state
        got = ours(ids, mask, types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-4)


def test_l1_penalty_is_the_weighted_l1_norm_of_the_scales():
    model = enable_slimming(BertModel(tiny_config()))
    randomise_scales(model)
    heads, neurons = (torch.cat(c) for c in coefficients(model))
    a, b = torch.rand(2).tolist()
    expected = a * F.l1_loss(heads, torch.zeros_like(heads), reduction="sum") \
        + b * F.l1_loss(neurons, torch.zeros_like(neurons), reduction="sum")
    torch.testing.assert_close(l1_penalty(model, a, b), expected)
    l1_penalty(model, a, b).backward()
    grad = model.encoder.layers[0].attention.head_scale.grad
    torch.testing.assert_close(grad, a * model.encoder.layers[0].attention.head_scale.detach().sign())


def official_ticket(head_coefs, ffn_coefs, head_ratio, ffn_ratio):
    """The EarlyBERT draw script's rule: per-layer quantile for heads, global quantile for neurons, keep c > q."""
    heads = np.stack([c.numpy() for c in head_coefs])
    ffn = np.stack([c.numpy() for c in ffn_coefs])
    keep_heads = heads > np.quantile(heads, head_ratio, axis=-1, keepdims=True)
    keep_ffn = ffn > np.quantile(ffn, ffn_ratio)
    return keep_heads, keep_ffn


def test_the_ticket_is_the_official_quantile_rule_on_berts_shapes():
    """12 heads at 1/3 and a multiple of 100 neurons at 0.4: the counts the official rule prunes."""
    layers = 4
    head_coefs = [torch.randn(12, dtype=torch.float64) for _ in range(layers)]
    ffn_coefs = [torch.randn(300, dtype=torch.float64) for _ in range(layers)]
    heads, ffn = draw_ticket(head_coefs, ffn_coefs)
    expected_heads, expected_ffn = official_ticket(head_coefs, ffn_coefs, 1 / 3, 0.4)
    assert np.array_equal(torch.stack(heads).numpy(), expected_heads)
    assert np.array_equal(torch.stack(ffn).numpy(), expected_ffn)
    assert all(int(h.sum()) == 8 for h in heads) and int(torch.stack(ffn).sum()) == 720
    assert len({int(f.sum()) for f in ffn}) > 1  # neurons are ranked over all layers: layers differ


def test_ranking_on_magnitude_keeps_large_negative_coefficients():
    coefs = [torch.tensor([-3.0, 0.1, 0.2, 2.0])]
    raw, _ = draw_ticket(coefs, [torch.rand(10)], head_ratio=0.5, ffn_ratio=0.0)
    by_size, _ = draw_ticket(coefs, [torch.rand(10)], head_ratio=0.5, ffn_ratio=0.0, rank_by="abs")
    assert raw[0].tolist() == [False, False, True, True]
    assert by_size[0].tolist() == [True, False, False, True]


def test_a_ratio_that_would_empty_a_layer_keeps_its_best_unit_and_says_so():
    heads = [torch.tensor([0.3, 0.9]), torch.tensor([0.5, 0.1])]
    with pytest.warns(UserWarning, match="remove every head of layer 0"):
        keep, _ = draw_ticket(heads, [torch.rand(4), torch.rand(4)], head_ratio=0.75, ffn_ratio=0.0)
    assert [k.tolist() for k in keep] == [[False, True], [True, False]]
    ffn = [torch.full((4,), -1.0), torch.rand(4) + 1]
    with pytest.warns(UserWarning, match="every FFN neuron of layer 0"):
        _, keep = draw_ticket([torch.rand(2)] * 2, ffn, head_ratio=0.0, ffn_ratio=0.5)
    assert int(keep[0].sum()) == 1 and keep[1].all()


def test_early_bird_finds_the_ticket_once_the_window_agrees():
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    base = torch.rand(200, generator=rng) < 0.6
    detector = EarlyBird(window=3, threshold=0.1)

    def flip(mask, count):
        mask = mask.clone()
        mask[torch.randperm(mask.numel(), generator=rng)[:count]] ^= True
        return mask

    far = flip(base, 60)  # 0.30 from base
    assert detector.update([far[:8]], [far[8:]]) == [] and not detector.found
    distances = detector.update([base[:8]], [base[8:]])
    assert distances == [pytest.approx(0.30)] and not detector.found  # fewer masks than the window
    near = flip(base, 10)
    assert detector.update([near[:8]], [near[8:]]) == [pytest.approx(0.30, abs=0.05), pytest.approx(0.05)]
    assert not detector.found  # the oldest mask is still far
    detector.update([base[:8]], [base[8:]])
    assert detector.found  # base, near, base: every distance 0.05 or 0
    again = EarlyBird()
    again.load_state_dict(detector.state_dict())
    assert again.found and again.window == 3


def masked_copy(model, head_keep, ffn_keep):
    """The unpruned model with the scales of every removed unit set to zero: what pruning must compute."""
    layers = (model.bert if hasattr(model, "bert") else model).encoder.layers
    with torch.no_grad():
        for layer, heads, neurons in zip(layers, head_keep, ffn_keep):
            layer.attention.head_scale[~heads] = 0
            layer.intermediate.neuron_scale[~neurons] = 0
    return model


def random_keep(sizes, fraction=0.5):
    keeps = [torch.rand(n) < fraction for n in sizes]
    for k in keeps:
        k[torch.randint(0, len(k), ())] = True
    return keeps


@pytest.mark.parametrize("padded", [True, False])
def test_the_pruned_model_computes_what_the_masked_model_computes(padded):
    config = tiny_config(num_hidden_layers=3, num_attention_heads=4, hidden_size=64, intermediate_size=40,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, slimming=True)
    model = BertForSequenceClassification(config).eval()
    randomise_scales(model)
    heads, ffn = random_keep([4] * 3), random_keep([40] * 3)
    masked = BertForSequenceClassification(dataclasses.replace(config)).eval()
    masked.load_state_dict(model.state_dict())
    masked_copy(masked, heads, ffn)
    prune(model, torch.stack(heads), torch.stack(ffn))
    assert model.config.heads_per_layer == [int(h.sum()) for h in heads]
    assert model.config.intermediate_size_per_layer == [int(f.sum()) for f in ffn]
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in masked.parameters())
    ids, mask, types = inputs(config)
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).logits, masked(ids, mask, types).logits)


def test_pruning_with_its_optimizer_trains_on_as_the_masked_model_does():
    """An AdamW step, the cut (moments cut with the weights), a second step: the pruned model computes what the masked
    model computes after the same two steps. A fresh optimizer at the cut would not (Adam's first update is not its
    second)."""
    config = tiny_config(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=40,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, slimming=True)
    model = BertForSequenceClassification(config)
    randomise_scales(model)
    heads, ffn = random_keep([4] * 2), random_keep([40] * 2)
    masked = BertForSequenceClassification(dataclasses.replace(config))
    masked.load_state_dict(model.state_dict())
    ids, mask, types = inputs(config)
    labels = torch.randint(0, 2, (len(ids),))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, masked)]

    def train_step(m, optimizer):
        optimizer.zero_grad()
        m(ids, mask, types, labels=labels).loss.backward()
        optimizer.step()

    for m, optimizer in zip((model, masked), optimizers):
        masked_copy(m, heads, ffn)  # the masked-out units contribute nothing to either model's first step
        train_step(m, optimizer)
    prune(model, heads, ffn, optimizer=optimizers[0])
    assert [id(p) for group in optimizers[0].param_groups for p in group["params"]] == \
        [id(p) for p in model.parameters()]
    masked_copy(masked, heads, ffn)
    for m, optimizer in zip((model, masked), optimizers):
        train_step(m, optimizer)
    masked_copy(masked, heads, ffn)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids, mask, types).logits, masked.eval()(ids, mask, types).logits)


def test_a_pruned_model_saves_loads_and_trains(tmp_path):
    config = tiny_config(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=48)
    model = enable_slimming(BertForSequenceClassification(config)).eval()
    prune(model, [torch.tensor([True, False]), torch.tensor([True, True])], random_keep([48, 48]))
    model.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.heads_per_layer == [1, 2] and loaded.config.slimming
    ids, mask, types = inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, types).logits, model(ids, mask, types).logits)
    loaded.train()
    loss = loaded(ids, mask, types, labels=torch.randint(0, 2, (len(ids),))).loss
    loss.backward()
    assert loaded.bert.encoder.layers[0].attention.head_scale.grad.shape == (1,)


def test_sizes_that_disagree_with_the_weights_are_refused(tmp_path):
    model = enable_slimming(BertModel(tiny_config(num_attention_heads=2)))
    prune(model, [torch.tensor([True, False])] * 2, random_keep([48, 48]))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["heads_per_layer"] = [2, 1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shapes do not fit"):
        BertModel.from_pretrained(tmp_path)


def test_stacked_and_multi_exit_models_prune_to_what_their_masks_compute():
    config = tiny_config(num_hidden_layers=2, num_attention_heads=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, slimming=True)
    model, masked = (MultiExitBert(dataclasses.replace(config), exit_pooling="mean").eval() for _ in range(2))
    stack(model)  # 2 -> 4 layers, scales copied with their layers
    randomise_scales(model)
    heads, ffn = random_keep([2] * 4), random_keep([48] * 4)
    stack(masked).load_state_dict(model.state_dict())
    masked_copy(masked, heads, ffn)
    prune(model, heads, ffn)
    ids, mask, types = inputs(config)
    with torch.no_grad():
        for got, expected in zip(model(ids, mask, types).exit_logits, masked(ids, mask, types).exit_logits):
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("call, message", [
    (lambda m: draw_ticket([torch.rand(4)], [torch.rand(4)], head_ratio=1.0), r"head_ratio must be in \[0, 1\)"),
    (lambda m: draw_ticket([torch.rand(4)], [torch.rand(4)], ffn_ratio=-0.1), r"ffn_ratio must be in \[0, 1\)"),
    (lambda m: draw_ticket([torch.rand(4)], [torch.rand(4)], rank_by="size"), "rank_by must be"),
    (lambda m: l1_penalty(m, -1e-4, 1e-4), "must be >= 0"),
    (lambda m: coefficients(BertModel(tiny_config())), "no slimming coefficients"),
    (lambda m: prune(m, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 48, dtype=torch.bool)),
     r"head_mask\[0\] has shape \(3,\); layer 0 has 2"),
    (lambda m: prune(m, torch.ones(2, 2), torch.ones(2, 48, dtype=torch.bool)), "must be bool"),
    (lambda m: prune(m, torch.ones(3, 2, dtype=torch.bool), torch.ones(2, 48, dtype=torch.bool)), "has 3 layers"),
    (lambda m: prune(m, torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 48, dtype=torch.bool)), "keeps nothing"),
])
def test_bad_ticket_requests_are_refused(call, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = enable_slimming(BertModel(tiny_config()))
    with pytest.raises(TicketError, match=message):
        call(model)
