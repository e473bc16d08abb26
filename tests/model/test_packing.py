"""Host-built index tensors (TokenPacking, label positions): same results as the model computing them itself,
checks against the mask and labels, moving between devices, and no device-to-host sync from the model's code."""

import dataclasses

import pytest
import torch
from bert_inputs import mlm_labels, ragged_batch, random_lengths, tiny_config
from host_syncs import SyncRecorder, as_on_a_gpu

import bertforge.model
from bertforge.model import (
    IGNORE_INDEX,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    TokenPacking,
    mlm_label_positions,
)


def random_mask(batch, seqlen):
    """A (batch, seq) 0/1 mask with holes and left padding too, and one row without any real token."""
    mask = (torch.rand(batch, seqlen) < 0.6).long()
    mask[0] = 0
    mask[-1] = 1
    return mask[torch.randperm(batch)]


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_from_attention_mask_matches_a_python_loop(dtype):
    mask = random_mask(6, 11)
    packing = TokenPacking.from_attention_mask(mask.to(dtype))
    rows = mask.tolist()
    indices = [b * 11 + s for b, row in enumerate(rows) for s, real in enumerate(row) if real]
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + sum(row))
    assert packing.indices.dtype == torch.int64 and packing.indices.tolist() == indices
    assert packing.cu_seqlens.dtype == torch.int32 and packing.cu_seqlens.tolist() == offsets
    assert packing.max_seqlen == max(sum(row) for row in rows) and type(packing.max_seqlen) is int


def test_mlm_label_positions_matches_a_python_loop():
    labels = torch.where(torch.rand(5, 9) < 0.3, torch.randint(0, 50, (5, 9)), IGNORE_INDEX)
    positions = mlm_label_positions(labels)
    expected = [i for i, label in enumerate(labels.flatten().tolist()) if label != IGNORE_INDEX]
    assert positions.dtype == torch.int64 and positions.tolist() == expected


def _loss_and_gradients(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    loss = out.loss if out.loss is not None else out.last_hidden_state.square().sum() + out.pooler_output.sum()
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_class", [BertForMaskedLM, BertModel, BertForSequenceClassification])
def test_passing_packing_and_label_positions_changes_nothing(model_class):
    model = model_class(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(5, 17))
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if model_class is BertForMaskedLM:
        batch["labels"] = mlm_labels(ids, mask, model.config.vocab_size)
    elif model_class is BertForSequenceClassification:
        batch["labels"] = torch.randint(0, 2, (5,))
    host_built = dict(packing=TokenPacking.from_attention_mask(mask))
    if model_class is BertForMaskedLM:
        host_built["label_positions"] = mlm_label_positions(batch["labels"])
    computed, g_computed = _loss_and_gradients(model, **batch)
    given, g_given = _loss_and_gradients(model, **batch, **host_built)
    for field in ("loss", "logits", "last_hidden_state", "pooler_output"):
        a, b = getattr(computed, field), getattr(given, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert g_computed.keys() == g_given.keys() and g_computed
    for name in g_computed:
        assert torch.equal(g_computed[name], g_given[name]), name


def _inconsistent_batch():
    ids = torch.randint(1, 97, (3, 8))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6])
    labels = torch.where(mask.bool() & (torch.arange(8) % 2 == 0), ids, IGNORE_INDEX)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _packing(batch):
    return TokenPacking.from_attention_mask(batch["attention_mask"])


INCONSISTENT = [  # (case, what replaces the batch's entries, error)
    ("indices of another mask", lambda b: dict(packing=TokenPacking.from_attention_mask(b["attention_mask"].flip(1))),
     "packing.indices does not match"),  # left padding: same cu_seqlens and max_seqlen, other indices
    ("lengths of another mask",
     lambda b: dict(packing=TokenPacking.from_attention_mask(b["attention_mask"].roll(1, 0))),
     "packing.indices does not match"),
    ("max_seqlen", lambda b: dict(packing=dataclasses.replace(_packing(b), max_seqlen=7)),
     "packing.max_seqlen = 7 but"),
    ("max_seqlen > seq", lambda b: dict(packing=dataclasses.replace(_packing(b), max_seqlen=9)),
     r"packing.max_seqlen must be an int in \[0, 8\], got 9"),
    ("int32 indices", lambda b: dict(packing=dataclasses.replace(_packing(b), indices=_packing(b).indices.int())),
     "packing.indices must be a 1-D torch.int64 tensor, got torch.int32"),
    ("cu_seqlens of 2 rows", lambda b: dict(packing=TokenPacking.from_attention_mask(b["attention_mask"][:2])),
     r"packing.cu_seqlens must have shape \(4,\) for a batch of 3, got \(3,\)"),
    ("packing on another device", lambda b: dict(packing=_packing(b).to("meta")),
     "packing.indices is on meta, input_ids on cpu"),
    ("not a TokenPacking", lambda b: dict(packing=dataclasses.asdict(_packing(b))),
     "packing must be a TokenPacking, got dict"),
    ("packing without mask", lambda b: dict(attention_mask=None, labels=None, packing=_packing(b)),
     "packing given without attention_mask"),
    ("positions of other labels", lambda b: dict(label_positions=mlm_label_positions(b["labels"])[1:]),
     "label_positions does not match labels"),
    ("int32 positions", lambda b: dict(label_positions=mlm_label_positions(b["labels"]).int()),
     "label_positions must be a 1-D int64 tensor, got torch.int32"),
    ("positions without labels", lambda b: dict(labels=None, label_positions=mlm_label_positions(b["labels"])),
     "label_positions given without labels"),
]


@pytest.mark.parametrize("case", INCONSISTENT, ids=lambda case: case[0])
def test_inconsistent_packing_or_label_positions_raise_on_cpu(case):
    _, overrides, message = case
    model = BertForMaskedLM(tiny_config())
    batch = _inconsistent_batch()
    with pytest.raises(ValueError, match=message):
        model(**{**batch, **overrides(batch)})


def test_to_moves_every_tensor_and_keeps_max_seqlen():
    packing = TokenPacking.from_attention_mask(random_mask(4, 6))
    batch = {"attention_mask": torch.ones(4, 6), "packing": packing}
    moved = {k: v.to("meta", non_blocking=True) for k, v in batch.items()}  # what a training loop does
    assert moved["packing"].indices.device.type == "meta" and moved["packing"].cu_seqlens.device.type == "meta"
    assert moved["packing"].max_seqlen == packing.max_seqlen
    assert packing.indices.device.type == "cpu", "to() must return a new TokenPacking, not move this one"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pin_memory_then_async_copy():
    packing = TokenPacking.from_attention_mask(random_mask(4, 6))
    pinned = packing.pin_memory()
    assert pinned.indices.is_pinned() and pinned.cu_seqlens.is_pinned() and not packing.indices.is_pinned()
    on_device = pinned.to("cuda", non_blocking=True)
    assert torch.equal(on_device.indices.cpu(), packing.indices)
    assert torch.equal(on_device.cu_seqlens.cpu(), packing.cu_seqlens)


# The model's code, and the padding helpers it calls to find and place real tokens (unpad is what reads the mask).
WATCHED = ("model", "kernels/padding.py")


def test_training_step_with_host_built_indices_never_syncs_from_model_code(monkeypatch):
    """On a GPU, value checks are off (checks_values is False for CUDA tensors without BERTFORGE_DEBUG=1); given
    packing and label_positions, forward + backward must not read device values from the model's code."""
    model = BertForMaskedLM(tiny_config()).train()
    ids, mask, types = ragged_batch(model.config.vocab_size, random_lengths(4, 13))
    labels = mlm_labels(ids, mask, model.config.vocab_size)
    batch = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    host_built = dict(packing=TokenPacking.from_attention_mask(mask), label_positions=mlm_label_positions(labels))
    as_on_a_gpu(monkeypatch)

    with SyncRecorder(WATCHED) as without_indices:  # the recorder sees the syncs of computing the indices here
        model(**batch).loss.backward()
    assert {name for name, _, _ in without_indices.calls} >= {"nonzero", "__int__"}, without_indices.calls

    with SyncRecorder(WATCHED) as with_indices:
        model(**batch, **host_built).loss.backward()
    assert with_indices.calls == []


def test_value_checks_follow_checks_values(monkeypatch):
    """A bad id raises on the CPU; with checks_values False (a GPU tensor without BERTFORGE_DEBUG) the check
    is skipped, and the shape checks stay."""
    model = BertModel(tiny_config())
    ids = torch.randint(1, 97, (2, 5))
    bad_mask = torch.full_like(ids, 2)
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model(ids, bad_mask)
    monkeypatch.setattr(bertforge.model.bert, "checks_values", lambda t: False)
    model(ids, bad_mask)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(ids, bad_mask[:, :3])
