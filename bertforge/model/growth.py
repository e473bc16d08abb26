"""Progressive stacking (Gong et al. 2019), in place: the encoder's layers [l0..l(L-1)] become
[l0..l(L-1), l0'..l(L-1)'], layer L+i a copy of layer i, on the live model and optimizer.

The existing nn.Parameter objects, and their optimizer state tensors, stay the same objects: nothing is
reallocated or copied for them. The copies join the optimizer's param groups of their sources. A model with an
exit per layer (MultiExitBert) gives each new layer a copy of its source layer's exit, which joins the optimizer
the same way.
"""

import copy

import torch
from torch.nn.parallel import DistributedDataParallel

OPTIMIZER_STATE_MODES = ("copy", "reset")


def unwrap(model):
    """The module inside a DistributedDataParallel (or torch.compile) wrapper, else the model itself."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def encoder_layers(model) -> torch.nn.ModuleList:
    """The `encoder.layers` ModuleList of a BertModel or of a model holding one as `.bert`."""
    module = unwrap(model)
    bert = module.bert if hasattr(module, "bert") else module
    if not hasattr(bert, "encoder") or not isinstance(getattr(bert.encoder, "layers", None), torch.nn.ModuleList):
        raise TypeError(f"{type(module).__name__} has no encoder.layers ModuleList to stack")
    return bert.encoder.layers


def depth(model) -> int:
    return len(encoder_layers(model))


def stack(model, optimizer=None, optimizer_state: str = "copy"):
    """Double the encoder's depth in place; returns the model (a DDP model comes back re-wrapped).

    optimizer_state: "copy" gives each new parameter a clone of its source's state (moments and step);
    "reset" leaves new parameters without state, as the paper's --reset-optimizer does for the copies.
    """
    if optimizer_state not in OPTIMIZER_STATE_MODES:
        raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {optimizer_state!r}")
    layers = encoder_layers(model)
    module = unwrap(model)
    old_depth = len(layers)

    pairs = []  # (source parameter, its copy)
    for layer in list(layers):
        clone = copy.deepcopy(layer)
        for (_, source), (_, new) in zip(layer.named_parameters(), clone.named_parameters()):
            new.grad = None
            pairs.append((source, new))
        layers.append(clone)
    if hasattr(module, "stack_exits"):  # a head per layer (MultiExitBert): new layers get copies of their sources'
        pairs += module.stack_exits()
    _grow_config(module, old_depth)
    if optimizer is not None:
        _add_to_optimizer(optimizer, pairs, optimizer_state)
    if isinstance(model, DistributedDataParallel):
        model = rewrap_ddp(model)
    return model


def configs_of(module) -> list:
    """The model's config and its encoder's (`.bert`), once each: a shape change updates every one."""
    configs = {id(c): c for c in (getattr(module, "config", None), getattr(getattr(module, "bert", None), "config", None))
               if c is not None}
    return list(configs.values())


def _grow_config(module, old_depth):
    for config in configs_of(module):
        config.num_hidden_layers = 2 * old_depth
        if config.heads_per_layer is not None:
            config.heads_per_layer = list(config.heads_per_layer) * 2
        if config.intermediate_size_per_layer is not None:
            config.intermediate_size_per_layer = list(config.intermediate_size_per_layer) * 2


def _add_to_optimizer(optimizer, pairs, optimizer_state):
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for source, new in pairs:
        group = group_of.get(id(source))
        if group is None:
            raise ValueError("a parameter of the encoder layers is not in the optimizer; "
                             "build the optimizer from model.parameters() before stacking")
        group["params"].append(new)
        if optimizer_state == "copy" and source in optimizer.state:
            optimizer.state[new] = {key: value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
                                    for key, value in optimizer.state[source].items()}


def rewrap_ddp(ddp: DistributedDataParallel) -> DistributedDataParallel:
    """A new DDP over the grown module: DDP fixes its parameter buckets at construction."""
    return DistributedDataParallel(
        ddp.module, device_ids=ddp.device_ids, output_device=ddp.output_device,
        broadcast_buffers=ddp.broadcast_buffers, find_unused_parameters=ddp.find_unused_parameters,
        process_group=ddp.process_group, gradient_as_bucket_view=ddp.gradient_as_bucket_view,
    )
