"""Progressive stacking in place: identity of old parameters and optimizer state, copies, optimizer membership."""

import pytest
import torch

from bertforge.model import BertConfig, BertForMaskedLM
from bertforge.model.growth import depth, encoder_layers, stack


def tiny_model(layers=2):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32)
    return BertForMaskedLM(config)


def mlm_batch(batch=3, seqlen=12, vocab=64):
    input_ids = torch.randint(5, vocab, (batch, seqlen))
    attention_mask = torch.arange(seqlen)[None, :] < torch.tensor([seqlen, 7, 3])[:, None]
    masked = (torch.rand(batch, seqlen) < 0.3) & attention_mask
    masked[:, 0] = True
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def train_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()


def test_stack_keeps_parameters_and_optimizer_state_in_place():
    model = tiny_model(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, mlm_batch())
    params_before = list(model.parameters())
    pointers_before = [p.data_ptr() for p in params_before]
    state_before = {id(p): {k: v for k, v in optimizer.state[p].items()} for p in params_before}
    state_pointers = {id(p): {k: v.data_ptr() for k, v in optimizer.state[p].items()} for p in params_before}

    assert stack(model, optimizer) is model
    assert depth(model) == 4 and model.config.num_hidden_layers == 4

    params_after = list(model.parameters())
    old = {id(p) for p in params_before}
    assert all(any(p is q for q in params_after) for p in params_before), "an old Parameter object was replaced"
    assert [p.data_ptr() for p in params_before] == pointers_before, "old parameter storage was reallocated"
    for p in params_before:
        for key, value in optimizer.state[p].items():
            assert value is state_before[id(p)][key], f"optimizer state {key!r} of an old parameter was replaced"
            assert value.data_ptr() == state_pointers[id(p)][key]
    new_params = [p for p in params_after if id(p) not in old]
    assert len(new_params) == sum(p.numel() > 0 for p in encoder_layers(model)[:2].parameters())
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_groups for p in new_params), "new parameters must join the optimizer"


def decay_groups_optimizer(model):
    """AdamW with two groups as training's build_optimizer makes them: weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-3)


@pytest.mark.parametrize("mode", ["copy", "reset"])
def test_copies_join_the_param_group_of_their_source(mode):
    model = tiny_model(2)
    optimizer = decay_groups_optimizer(model)
    train_step(model, optimizer, mlm_batch())
    stack(model, optimizer, optimizer_state=mode)
    group_index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    layers = encoder_layers(model)
    pairs = [(name, source, copy) for i in range(2)
             for (name, source), (_, copy) in zip(layers[i].named_parameters(), layers[i + 2].named_parameters())]
    assert any(source.dim() < 2 for _, source, _ in pairs) and any(source.dim() >= 2 for _, source, _ in pairs)
    for name, source, copy in pairs:
        assert group_index[id(copy)] == group_index[id(source)], f"{name}: copy in another group than its source"
        expected_decay = 0.01 if copy.dim() >= 2 else 0.0
        assert optimizer.param_groups[group_index[id(copy)]]["weight_decay"] == expected_decay, name
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mode", ["copy", "reset"])
def test_copies_equal_their_sources_without_sharing_storage(mode):
    model = tiny_model(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, mlm_batch())
    stack(model, optimizer, optimizer_state=mode)
    layers = encoder_layers(model)
    for i in range(2):
        for (name, source), (_, copy) in zip(layers[i].named_parameters(), layers[i + 2].named_parameters()):
            assert torch.equal(source, copy), name
            assert source.data_ptr() != copy.data_ptr(), f"{name} shares storage with its source"
            if mode == "copy":
                for key, value in optimizer.state[source].items():
                    assert torch.equal(value, optimizer.state[copy][key])
                    assert value.data_ptr() != optimizer.state[copy][key].data_ptr()
            else:
                assert copy not in optimizer.state


def test_stacked_model_matches_a_fresh_model_of_the_same_weights():
    model = tiny_model(2).eval()
    stack(model)
    fresh = BertForMaskedLM(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    batch = mlm_batch()
    assert torch.equal(model(**batch).loss, fresh(**batch).loss)


@pytest.mark.parametrize("mode", ["copy", "reset"])
def test_a_step_after_stacking_updates_every_layer(mode):
    model = tiny_model(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    train_step(model, optimizer, mlm_batch())
    stack(model, optimizer, optimizer_state=mode)
    stack(model, optimizer, optimizer_state=mode)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer, mlm_batch())
    for (name, p), b in zip(model.named_parameters(), before):
        if "layers" in name and p.requires_grad:
            assert not torch.equal(p, b), f"{name} did not change"
    assert depth(model) == 4


def test_bad_arguments():
    model = tiny_model(1)
    with pytest.raises(ValueError, match="optimizer_state"):
        stack(model, optimizer_state="keep")
    optimizer = torch.optim.AdamW(model.bert.embeddings.parameters())  # the layers' parameters are missing
    with pytest.raises(ValueError, match="not in the optimizer"):
        stack(model, optimizer)
    with pytest.raises(TypeError, match="encoder.layers"):
        stack(torch.nn.Linear(2, 2))
