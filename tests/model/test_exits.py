"""Multi-exit BERT and early exit: every exit against transformers' hidden states, checkpoints in and out, stacking,
exit rules against a per-sample reference, batched exits against one sample at a time, rows that leave, and the
per-layer pools of a request stream against one request at a time."""

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from bert_inputs import ragged_batch, random_lengths, tiny_config
from host_syncs import SyncRecorder, as_on_a_gpu
from safetensors.torch import load_file

from bertforge.model import (
    BertForSequenceClassification,
    MultiExitBert,
    TokenPacking,
    early_exit,
    pooled_early_exit,
)
from bertforge.model.growth import stack
from bertforge.train.corpus import minilm_checkpoint, news_articles
from bertforge.train.tokenizer import load_tokenizer

LAYOUTS = ["per_exit_pooler", "shared_pooler"]


def relative_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def exit_parameters(model):
    """(pooler weight, pooler bias, classifier weight, classifier bias) of each layer's exit, first to last."""
    return [(p.dense.weight, p.dense.bias, c.weight, c.bias) for p, c in model.exit_heads()]


def randomised(model, std=0.5):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


@pytest.fixture(scope="module")
def minilm():
    """MultiExitBert on the real all-MiniLM-L6-v2 weights, one per layout, and a tokenizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fresh heads' warnings: tested below
        models = {layout: MultiExitBert.from_pretrained(minilm_checkpoint(), num_labels=3, layout=layout).eval()
                  for layout in LAYOUTS}
    return models, load_tokenizer(minilm_checkpoint())


def news_batch(tokenizer, batch, longest=40):
    """Random news articles, each cut to a random length in [4, longest] tokens ([CLS] ... [SEP]), right-padded."""
    sep = tokenizer.token_to_id("[SEP]")
    articles = news_articles()
    rows = [tokenizer.encode(articles[i]).ids for i in torch.randperm(len(articles))[:batch].tolist()]
    rows = [ids[:n - 1] + [sep] for ids, n in zip(rows, torch.randint(4, longest + 1, (batch,)).tolist())]
    width = max(map(len, rows))
    ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows])
    return ids, (ids != 0).long()


def random_heads(model, ids, mask, spread=2.0, most=50.0):
    """Random exit classifiers with biases centring their logits on this batch, scaled (at most `most` times) so
    that samples differ by about `spread`: the real checkpoint's early [CLS] states are nearly alike across texts,
    and plain random heads would see only what they share. Returns the new exit logits."""
    with torch.no_grad():
        for _, classifier in model.exit_heads():
            torch.nn.init.normal_(classifier.weight)
            classifier.bias.zero_()
        for (_, classifier), z in zip(model.exit_heads(), model(ids, mask).exit_logits):
            factor = min(spread / (z - z.mean(0)).std(), most)
            classifier.weight.mul_(factor)
            classifier.bias.copy_(-factor * z.mean(0))
        return model(ids, mask).exit_logits


# -- the multi-exit model -------------------------------------------------------------------------------------


def test_every_exit_matches_transformers_hidden_states_on_real_checkpoint(minilm):
    models, tokenizer = minilm
    ids, mask = news_batch(tokenizer, 6)
    theirs = transformers.BertModel.from_pretrained(minilm_checkpoint(), attn_implementation="sdpa").eval()
    with torch.no_grad():
        hidden = theirs(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    for layout, ours in models.items():
        with torch.no_grad():
            for pooler, classifier in ours.exit_heads():
                for p in (*pooler.parameters(), *classifier.parameters()):
                    p.normal_(0, 0.1 if p is pooler.dense.weight else 1.0)
            got = ours(ids, mask).exit_logits
        assert len(got) == len(hidden) == 6
        for i, (z, h, (pool_w, pool_b, w, b)) in enumerate(zip(got, hidden, exit_parameters(ours))):
            expected = F.linear(torch.tanh(F.linear(h[:, 0], pool_w, pool_b)), w, b)
            err = relative_error(z, expected)
            assert err <= 1e-5, f"{layout}, exit {i + 1}: relative error {err:.1e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mean_pooling_exits_read_the_mean_of_real_tokens_and_the_final_exit_reads_cls(layout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = MultiExitBert.from_pretrained(minilm_checkpoint(), num_labels=3, layout=layout,
                                             exit_pooling="mean").eval()
    ids, mask = news_batch(load_tokenizer(minilm_checkpoint()), 6)
    theirs = transformers.BertModel.from_pretrained(minilm_checkpoint(), attn_implementation="sdpa").eval()
    with torch.no_grad():
        hidden = theirs(ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        for pooler, classifier in ours.exit_heads():
            for p in (*pooler.parameters(), *classifier.parameters()):
                p.normal_(0, 0.1 if p is pooler.dense.weight else 1.0)
        got = ours(ids, mask).exit_logits
    weights = mask[..., None].double()
    for i, (z, h, (pool_w, pool_b, w, b)) in enumerate(zip(got, hidden, exit_parameters(ours))):
        read = h[:, 0] if i == len(hidden) - 1 else ((h.double() * weights).sum(1) / weights.sum(1)).float()
        expected = F.linear(torch.tanh(F.linear(read, pool_w, pool_b)), w, b)
        err = relative_error(z, expected)
        assert err <= 1e-5, f"exit {i + 1}: relative error {err:.1e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_pretrained_new_exits_start_from_the_checkpoint_pooler(layout):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = MultiExitBert.from_pretrained(minilm_checkpoint(), num_labels=4, layout=layout)
    messages = " | ".join(str(w.message) for w in caught)
    assert "has no exits: new ones" in messages and "'classifier.weight'" in messages  # the final one is fresh too
    checkpoint = load_file(minilm_checkpoint() / "model.safetensors")
    assert torch.equal(model.bert.pooler.dense.weight, checkpoint["pooler.dense.weight"])
    assert len(model.exits) == 5
    for e in model.exits:
        assert e.classifier.weight.shape == (4, 384)
        if layout == "shared_pooler":
            assert e.pooler is None
            continue
        assert torch.equal(e.pooler.dense.weight, checkpoint["pooler.dense.weight"])
        assert torch.equal(e.pooler.dense.bias, checkpoint["pooler.dense.bias"])
        assert e.pooler.dense.weight.data_ptr() != model.bert.pooler.dense.weight.data_ptr()  # a copy, own storage
    classifiers = torch.stack([c.weight for _, c in model.exit_heads()])
    assert all(not torch.equal(classifiers[0], c) for c in classifiers[1:]), "classifiers must be drawn apart"


@pytest.mark.parametrize("layout, exit_pooling", [("per_exit_pooler", "cls"), ("shared_pooler", "mean")])
def test_save_load_round_trip_and_transformers_reads_the_final_exit(layout, exit_pooling, tmp_path):
    model = randomised(MultiExitBert(tiny_config(num_hidden_layers=3, num_labels=3), layout, exit_pooling))
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(4, 13))
    model.save_pretrained(tmp_path)
    back = MultiExitBert.from_pretrained(tmp_path).eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours, again = model(ids, mask, types), back(ids, mask, types)
        final = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (back.layout, back.exit_pooling) == (layout, exit_pooling)
    assert all(torch.equal(a, b) for a, b in zip(ours.exit_logits, again.exit_logits))
    assert type(theirs).__name__ == "BertForSequenceClassification"
    assert (final - ours.exit_logits[-1]).abs().max() <= 1e-5
    other = LAYOUTS[1 - LAYOUTS.index(layout)]
    with pytest.raises(ValueError, match=f"holds a '{layout}' multi-exit model, not '{other}'"):
        MultiExitBert.from_pretrained(tmp_path, layout=other)
    other = "mean" if exit_pooling == "cls" else "cls"
    with pytest.raises(ValueError, match=f"exits read '{exit_pooling}', not '{other}'"):
        MultiExitBert.from_pretrained(tmp_path, exit_pooling=other)


def test_final_exit_is_bert_for_sequence_classification_and_labels_give_its_loss():
    model = randomised(MultiExitBert(tiny_config(num_hidden_layers=3, num_labels=3)))
    plain = BertForSequenceClassification(model.config).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("exits.")})
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(5, 11))
    labels = torch.randint(0, 3, (5,))
    out, expected = model(ids, mask, types, labels=labels), plain(ids, mask, types, labels=labels)
    assert (out.logits - expected.logits).abs().max() <= 1e-5 and out.logits is out.exit_logits[-1]
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_exit_trains(layout):
    model = MultiExitBert(tiny_config(num_hidden_layers=3), layout).train()
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(4, 9))
    labels = torch.randint(0, 2, (4,))
    sum(F.cross_entropy(z, labels) for z in model(ids, mask, types).exit_logits).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stack_gives_new_layers_copies_of_their_sources_exits(layout):
    model = MultiExitBert(tiny_config(num_hidden_layers=2, hidden_dropout_prob=0.0), layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(3, 9))
    labels = torch.randint(0, 2, (3,))

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        sum(F.cross_entropy(z, labels) for z in model(ids, mask, types, labels=labels).exit_logits).backward()
        optimizer.step()

    train_step()
    before = exit_parameters(model)
    values = [[t.detach().clone() for t in head] for head in before]
    stack(model, optimizer)
    after = exit_parameters(model)
    assert len(model.exits) == 3 and model.config.num_hidden_layers == 4
    assert all(a is b for a, b in zip(after[0], before[0])), "layer 1 keeps its exit"
    assert all(a is b for a, b in zip(after[3], before[1])), "the final exit stays the last layer's"
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    own = slice(0, 4) if layout == "per_exit_pooler" else slice(2, 4)  # shared: one pooler for every layer
    for new_layer, source_layer in ((1, 1), (2, 0)):  # layer 2 gets the old final exit's copy, layer 3 exit 1's
        for new, source, value in zip(after[new_layer][own], before[source_layer][own], values[source_layer][own]):
            assert new is not source and torch.equal(new, value)
            assert group_of[id(new)] == group_of[id(source)]
            assert torch.equal(optimizer.state[new]["exp_avg"], optimizer.state[source]["exp_avg"])
            assert optimizer.state[new]["exp_avg"] is not optimizer.state[source]["exp_avg"]
    if layout == "shared_pooler":
        assert all(pooler is model.bert.pooler for pooler, _ in model.exit_heads())
    assert len(model(ids, mask, types).exit_logits) == 4
    train_step()  # the new exits train, through the optimizer they joined
    for head, value in zip(after[1:3], values[1::-1]):
        assert not torch.equal(head[2], value[2])


def test_pruned_model_exits_run_round_trip_and_stack(tmp_path):
    config = tiny_config(num_hidden_layers=3, heads_per_layer=[1, 2, 1], intermediate_size_per_layer=[8, 48, 20])
    model = randomised(MultiExitBert(config))
    ids, mask, types = ragged_batch(config.vocab_size, random_lengths(3, 10))
    model.save_pretrained(tmp_path)
    back = MultiExitBert.from_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(model(ids, mask, types).exit_logits,
                                                 back(ids, mask, types).exit_logits))
    stack(back)
    assert back.config.heads_per_layer == [1, 2, 1] * 2 and len(back(ids, mask, types).exit_logits) == 6


# -- early exit -------------------------------------------------------------------------------------------------


def rule_values(exit_logits, criterion):
    """(batch, layers): what each exit's rule looks at, computed without early_exit's code."""
    z = torch.stack(exit_logits, dim=1)
    if criterion == "entropy":
        return torch.distributions.Categorical(logits=z).entropy()
    if criterion == "confidence":
        return z.softmax(-1).max(-1).values
    return z.argmax(-1)


def reference_exit_layers(values, criterion, limit):
    """The layer, 1..L, at which each sample leaves: a direct loop over its per-layer values."""
    layers = []
    for row in values.tolist():
        streak = 0
        for layer, value in enumerate(row, start=1):
            if criterion == "patience":
                streak = streak + 1 if layer > 1 and value == row[layer - 2] else 0
                leaves = limit > 0 and streak == limit
            else:
                leaves = value < limit if criterion == "entropy" else value >= limit
            if leaves or layer == len(row):
                layers.append(layer)
                break
    return torch.tensor(layers)


def spreading_limit(values, criterion):
    """The threshold (or patience) that sends the samples out at the most different layers; thresholds sit at
    least 5e-3 from every value, so that float noise between batch compositions cannot flip a decision."""
    if criterion == "patience":
        candidates = range(1, values.shape[1] - 1)
    else:
        v = values[:, :-1].flatten().sort().values.tolist()
        candidates = [(a + b) / 2 for a, b in itertools.pairwise(v) if b - a > 1e-2]
    return max(candidates, key=lambda c: len(set(reference_exit_layers(values, criterion, c).tolist())))


def rule(criterion, limit):
    return {"criterion": criterion, ("patience" if criterion == "patience" else "threshold"): limit}


# Each criterion with the layout of the papers that use it (DeeBERT / RomeBERT: entropy; PABEE: patience).
PAIRS = [("per_exit_pooler", "entropy"), ("per_exit_pooler", "confidence"), ("shared_pooler", "patience")]
# ... and each once more with exits that read the mean of their layer's tokens.
POOLED_PAIRS = [(layout, criterion, pooling) for layout, criterion in PAIRS for pooling in ("cls", "mean")]


@pytest.mark.parametrize("layout, criterion, exit_pooling", POOLED_PAIRS)
def test_batched_early_exit_matches_reference_and_one_sample_at_a_time_on_real_checkpoint(minilm, layout,
                                                                                         criterion, exit_pooling):
    models, tokenizer = minilm
    model = models[layout]
    if exit_pooling != model.exit_pooling:
        model = copy.deepcopy(model)
        model.exit_pooling = exit_pooling
    ids, mask = news_batch(tokenizer, 10, longest=24)
    # Random heads until the samples leave at three or more layers (1 draw in 60 sent them to two: patience) and,
    # for patience, every exit's argmax is clear of float noise (< 1e-4).
    spread = []
    for _ in range(20):
        exit_logits = random_heads(model, ids, mask)
        top2 = torch.stack(exit_logits).topk(2, dim=-1).values
        if criterion == "patience" and (top2[..., 0] - top2[..., 1]).min() <= 1e-3:
            continue
        values = rule_values(exit_logits, criterion)
        limit = spreading_limit(values, criterion)
        expected_layers = reference_exit_layers(values, criterion, limit)
        spread.append(len(set(expected_layers.tolist())))
        if spread[-1] >= 3:
            break
    assert spread and spread[-1] >= 3, f"samples should leave at different layers: {spread} layers in each draw"

    got = early_exit(model, ids, mask, **rule(criterion, limit))
    assert torch.equal(got.exit_layers, expected_layers)
    expected_logits = torch.stack([exit_logits[layer - 1][s] for s, layer in enumerate(expected_layers.tolist())])
    assert (got.logits - expected_logits).abs().max() <= 1e-3  # fp32 noise, scaled up to 50 times by the heads
    assert torch.equal(got.predictions, got.logits.argmax(-1)) and got.predictions.dtype == torch.int64

    for s, length in enumerate(mask.sum(1).tolist()):
        alone = early_exit(model, ids[s:s + 1, :length], **rule(criterion, limit))
        assert alone.exit_layers.item() == got.exit_layers[s].item(), f"sample {s}"
        assert alone.predictions.item() == got.predictions[s].item(), f"sample {s}"
        assert (alone.logits[0] - got.logits[s]).abs().max() <= 1e-3, f"sample {s}"


def count_rows_per_layer(model):
    """Forward hooks recording, at each layer, (tokens, sequences) of the batch it runs."""
    seen = [[] for _ in model.bert.encoder.layers]
    handles = [layer.register_forward_hook(lambda m, args, out, i=i: seen[i].append((args[0].shape[0],
                                                                                       args[1].batch)))
               for i, layer in enumerate(model.bert.encoder.layers)]
    return seen, handles


@pytest.mark.parametrize("layout, criterion", PAIRS)
def test_rows_that_leave_are_removed_from_the_computation(layout, criterion, monkeypatch):
    model = MultiExitBert(tiny_config(num_hidden_layers=5, num_labels=3), layout).eval()
    lengths = random_lengths(12, 20)
    ids, mask, _ = ragged_batch(model.config.vocab_size, lengths)
    values = rule_values(random_heads(model, ids, mask), criterion)
    limit = spreading_limit(values, criterion)
    packing = TokenPacking.from_attention_mask(mask)
    seen, handles = count_rows_per_layer(model)
    as_on_a_gpu(monkeypatch)
    try:
        with SyncRecorder(["model"]) as syncs:
            got = early_exit(model, ids, mask, packing=packing, **rule(criterion, limit))
    finally:
        for h in handles:
            h.remove()
    layers = got.exit_layers
    assert torch.equal(layers, reference_exit_layers(values, criterion, limit))
    assert len(set(layers.tolist())) >= 2
    for i, calls in enumerate(seen, start=1):
        running = layers >= i
        expected = [(int(lengths[running].sum()), int(running.sum()))] if running.any() else []
        assert calls == expected, f"layer {i}"
    # One host read per layer that decides (the last one does not), nothing else.
    assert len(syncs.calls) == min(int(layers.max()), 4) and {name for name, _, _ in syncs.calls} == {"tolist"}


def test_everyone_at_the_first_layer_or_at_the_last():
    model = randomised(MultiExitBert(tiny_config(num_hidden_layers=3, num_labels=3)), std=0.3)
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(6, 12))
    with torch.no_grad():
        exit_logits = model(ids, mask, types).exit_logits
    seen, handles = count_rows_per_layer(model)
    first = [early_exit(model, ids, mask, types, criterion="entropy", threshold=math.log(3) + 1e-3),
             early_exit(model, ids, mask, types, criterion="confidence", threshold=1e-6)]
    assert seen[1] == [] and seen[2] == []  # nobody ran past layer 1
    last = [early_exit(model, ids, mask, types, criterion="entropy", threshold=0.0),
            early_exit(model, ids, mask, types, criterion="patience", patience=0)]
    for h in handles:
        h.remove()
    for got, layer in [(g, 1) for g in first] + [(g, 3) for g in last]:
        assert torch.equal(got.exit_layers, torch.full((6,), layer))
        assert (got.logits - exit_logits[layer - 1]).abs().max() <= 1e-5
        assert torch.equal(got.predictions, exit_logits[layer - 1].argmax(-1))
    # Without a mask every token is real: the same as an all-ones mask.
    full = torch.ones_like(ids)
    a = early_exit(model, ids, criterion="patience", patience=1)
    b = early_exit(model, ids, full, criterion="patience", patience=1)
    assert torch.equal(a.exit_layers, b.exit_layers) and torch.equal(a.logits, b.logits)


def crafted_exits(model, biases):
    """Every exit's logits fixed to its bias (zero weights), whatever the input."""
    with torch.no_grad():
        for (_, classifier), bias in zip(model.exit_heads(), biases):
            classifier.weight.zero_()
            classifier.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return model


@pytest.mark.parametrize("patience, layer", [(0, 6), (1, 2), (2, 5), (3, 6)])
def test_patience_counts_agreeing_layers_in_a_row(patience, layer):
    one_hot = {0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0]}
    predictions = [0, 0, 1, 1, 1, 0]  # agreements with the layer before: -, yes, no, yes, yes, no
    model = crafted_exits(MultiExitBert(tiny_config(num_hidden_layers=6, num_labels=3)).eval(),
                          [one_hot[p] for p in predictions])
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(3, 7))
    got = early_exit(model, ids, mask, types, criterion="patience", patience=patience)
    assert torch.equal(got.exit_layers, torch.full((3,), layer))
    assert torch.equal(got.predictions, torch.full((3,), predictions[layer - 1]))


@pytest.mark.parametrize("criterion, threshold, layer", [("entropy", 0.0, 4), ("entropy", 1e-30, 2),
                                                         ("confidence", 1.0, 2), ("confidence", 0.34, 2)])
def test_thresholds_at_their_bounds(criterion, threshold, layer):
    """Exit 2 is certain to float precision (softmax exactly one-hot: entropy 0, confidence 1), the others uniform.
    Entropy must be strictly below its threshold, confidence at least its threshold."""
    model = crafted_exits(MultiExitBert(tiny_config(num_hidden_layers=4, num_labels=3)).eval(),
                          [[0.0, 0.0, 0.0], [0.0, 200.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(3, 7))
    got = early_exit(model, ids, mask, types, criterion=criterion, threshold=threshold)
    assert torch.equal(got.exit_layers, torch.full((3,), layer))


BAD_RULES = [  # (rule, error)
    (dict(criterion="depth", threshold=0.5), r"criterion must be one of \('entropy', 'confidence', 'patience'\)"),
    (dict(criterion="entropy"), "criterion 'entropy' needs a threshold"),
    (dict(criterion="confidence"), "criterion 'confidence' needs a threshold"),
    (dict(criterion="patience"), "criterion 'patience' needs patience="),
    (dict(criterion="entropy", threshold=-0.1), "entropy threshold must be a number >= 0, got -0.1"),
    (dict(criterion="entropy", threshold=float("nan")), "entropy threshold must be a number >= 0, got nan"),
    (dict(criterion="entropy", threshold=True), "entropy threshold must be a number >= 0, got True"),
    (dict(criterion="confidence", threshold=0.0), r"confidence threshold must be a number in \(0, 1\], got 0.0"),
    (dict(criterion="confidence", threshold=1.01), r"confidence threshold must be a number in \(0, 1\], got 1.01"),
    (dict(criterion="patience", patience=-1), r"patience must be an int in \[0, 3\) for a 3-layer model, got -1"),
    (dict(criterion="patience", patience=3), r"patience must be an int in \[0, 3\) for a 3-layer model, got 3"),
    (dict(criterion="patience", patience=1.0), r"patience must be an int in \[0, 3\) for a 3-layer model, got 1.0"),
    (dict(criterion="patience", patience=1, threshold=0.5), "threshold is for the entropy and confidence"),
    (dict(criterion="entropy", threshold=0.5, patience=1), "patience is for criterion 'patience', not 'entropy'"),
]


@pytest.mark.parametrize("case", BAD_RULES, ids=lambda case: str(case[0]))
def test_bad_rules_raise(case):
    kwargs, message = case
    model = MultiExitBert(tiny_config(num_hidden_layers=3)).eval()
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match=message):
        early_exit(model, ids, **kwargs)


def test_bad_models_and_inputs_raise(tmp_path):
    ids = torch.randint(1, 97, (2, 5))
    model = MultiExitBert(tiny_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"early exit needs model.eval\(\)"):
        early_exit(model, ids, criterion="patience", patience=1)
    model.eval()
    with pytest.raises(ValueError, match="early exit needs a MultiExitBert, got BertForSequenceClassification"):
        early_exit(BertForSequenceClassification(tiny_config()).eval(), ids, criterion="patience", patience=1)
    with pytest.raises(ValueError, match=r"early exit needs a classifier \(num_labels >= 2\), got num_labels = 1"):
        early_exit(MultiExitBert(tiny_config(num_labels=1)).eval(), ids, criterion="entropy", threshold=0.1)
    left_padded = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"every sequence must start with a real token \(\[CLS\]\)"):
        early_exit(model, ids, left_padded, criterion="entropy", threshold=0.1)
    with pytest.raises(ValueError, match=r"every sequence must start with a real token \(\[CLS\]\)"):
        model(ids, left_padded)
    with pytest.raises(ValueError, match="labels must have batch size 2 first, got \\(3,\\)"):
        model(ids, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"layout must be one of \('per_exit_pooler', 'shared_pooler'\), got 'deeb"):
        MultiExitBert(tiny_config(), layout="deebert")
    del model.exits[-1]  # layers added by hand, not by growth.stack: no exit for the last early layer
    with pytest.raises(ValueError, match="1 exits for 3 layers: grow the model with bertforge.model.growth.stack"):
        model(ids)


# -- a stream of requests through per-layer pools ----------------------------------------------------------------


@pytest.mark.parametrize("layout, criterion, exit_pooling", POOLED_PAIRS)
def test_pooled_early_exit_matches_early_exit_one_request_at_a_time(layout, criterion, exit_pooling):
    model = MultiExitBert(tiny_config(num_hidden_layers=5, num_labels=3), layout, exit_pooling).eval()
    lengths = random_lengths(30, 20)
    ids, mask, _ = ragged_batch(model.config.vocab_size, lengths)
    values = rule_values(random_heads(model, ids, mask), criterion)
    limit = spreading_limit(values, criterion)
    requests = [ids[i, :n] for i, n in enumerate(lengths.tolist())]
    seen, handles = count_rows_per_layer(model)
    try:
        served = list(pooled_early_exit(model, iter(requests), 4, **rule(criterion, limit)))
    finally:
        for h in handles:
            h.remove()
    assert sorted(index for index, _, _ in served) == list(range(30)), "every request leaves exactly once"
    layers = {index: layer for index, _, layer in served}
    assert len(set(layers.values())) >= 2
    for index, prediction, layer in served:
        alone = early_exit(model, requests[index][None], **rule(criterion, limit))
        assert (prediction, layer) == (alone.predictions.item(), alone.exit_layers.item()), f"request {index}"
    for depth, calls in enumerate(seen, start=1):
        assert sum(batch for _, batch in calls) == sum(layer >= depth for layer in layers.values()), f"layer {depth}"
    # Full batches: a layer runs a partial one only when the stream has ended, once at most.
    batches = [batch for calls in seen for _, batch in calls]
    assert max(batches) == 4 and sum(batch < 4 for batch in batches) <= 5


def test_pooled_early_exit_serves_a_stream_as_it_comes():
    """Outputs come while the stream goes on, having read only what the pools hold (< 2 batches per layer)."""
    model = MultiExitBert(tiny_config(num_hidden_layers=3)).eval()
    taken = 0

    def stream(n=2000):
        nonlocal taken
        for _ in range(n):
            taken += 1
            yield torch.randint(1, model.config.vocab_size, (int(torch.randint(1, 12, ())),))

    served = list(itertools.islice(pooled_early_exit(model, stream(), 3, criterion="patience", patience=1), 10))
    assert len(served) == 10 and all(2 <= layer <= 3 for _, _, layer in served)
    assert taken <= 10 + 3 * 2 * 3, f"read {taken} requests to serve 10"
    assert list(pooled_early_exit(model, iter([]), 3, criterion="patience", patience=1)) == []


def test_pooled_early_exit_bad_inputs_raise():
    model = MultiExitBert(tiny_config(num_hidden_layers=3)).eval()
    requests = [torch.randint(1, 97, (5,)), torch.randint(1, 97, (2, 5))]
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        pooled_early_exit(model, iter(requests), 0, criterion="patience", patience=1)
    with pytest.raises(ValueError, match="criterion 'entropy' needs a threshold"):  # at the call, not when iterated
        pooled_early_exit(model, iter(requests), 2, criterion="entropy")
    with pytest.raises(ValueError, match=r"request 1: input_ids must be a 1-D tensor of token ids, got \(2, 5\)"):
        list(pooled_early_exit(model, iter(requests), 2, criterion="patience", patience=1))
    with pytest.raises(ValueError, match=r"request 0: input_ids out of range: got 500"):
        list(pooled_early_exit(model, iter([torch.tensor([1, 500])]), 2, criterion="patience", patience=1))
