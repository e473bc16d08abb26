"""EarlyBERT's structured tickets (Chen et al., ACL 2021): slimming coefficients, ticket drawing, early-bird
detection and physical pruning.

- Slimming: a learnable scale per attention head (on the head's output, before the output projection) and per FFN
  neuron (after GELU), initialised to 1; `BertConfig.slimming` creates them, `enable_slimming` adds them to a
  built model. The search trains them with an L1 penalty (`l1_penalty`).
- A ticket (`draw_ticket`): per layer, the lowest `head_ratio` of its heads; over all layers together, the lowest
  `ffn_ratio` of the FFN neurons. It prunes exactly round(ratio * n) units, the official code's count on BERT's
  shapes (4 of 12 heads per layer; 40% of the neurons), ranking on the raw coefficient as the official code does
  (`rank_by="abs"` ranks on |c|, as the Early-Bird-Tickets code ranks its |gamma|).
- `EarlyBird`: the mask of each record against the previous ones; the ticket is drawn once the newest mask is
  within a normalised Hamming distance of `threshold` of each of the `window - 1` masks before it (the rule of the
  Early-Bird-Tickets code, which the EarlyBERT code lacks).
- `prune(model, head_mask, ffn_mask, optimizer=None)` cuts each layer's weights to the kept heads and neurons, in
  place (and, given the optimizer, their state: training goes on); layers may end up with different sizes, which the
  config records (heads_per_layer, intermediate_size_per_layer), so the pruned model saves and loads.
"""

import warnings

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from .growth import configs_of, encoder_layers, rewrap_ddp, unwrap

HEAD_SCALE, NEURON_SCALE = "head_scale", "neuron_scale"


class TicketError(ValueError):
    """A bad ticket request: a ratio out of range, a mask of the wrong shape or dtype."""


def enable_slimming(model):
    """Give every layer of a built model its slimming scales (ones), if it has none yet; returns the model."""
    module = unwrap(model)
    for layer in encoder_layers(module):
        attention, intermediate = layer.attention, layer.intermediate
        device = attention.qkv.weight.device
        if attention.head_scale is None:
            attention.head_scale = nn.Parameter(torch.ones(attention.heads, device=device))
        if intermediate.neuron_scale is None:
            intermediate.neuron_scale = nn.Parameter(torch.ones(intermediate.out_features, device=device))
    for config in configs_of(module):
        config.slimming = True
    return model


def _slimmed_layers(model) -> nn.ModuleList:
    """The encoder layers, checked to carry slimming coefficients."""
    layers = encoder_layers(model)
    if any(layer.attention.head_scale is None for layer in layers):
        raise TicketError("the model has no slimming coefficients: build it with BertConfig(slimming=True) or call "
                          "enable_slimming(model)")
    return layers


def coefficients(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head scales, neuron scales): one fp32 copy per layer each (a copy: records must not follow training)."""
    layers = _slimmed_layers(model)
    return ([layer.attention.head_scale.detach().float().clone() for layer in layers],
            [layer.intermediate.neuron_scale.detach().float().clone() for layer in layers])


def l1_penalty(model, head_lambda: float, ffn_lambda: float) -> torch.Tensor:
    """head_lambda * sum |head scales| + ffn_lambda * sum |neuron scales| (the search's sparsity term)."""
    if head_lambda < 0 or ffn_lambda < 0:
        raise TicketError(f"the L1 weights must be >= 0, got {head_lambda} (heads) and {ffn_lambda} (FFN)")
    layers = _slimmed_layers(model)
    heads = sum(layer.attention.head_scale.abs().sum() for layer in layers)
    neurons = sum(layer.intermediate.neuron_scale.abs().sum() for layer in layers)
    return head_lambda * heads + ffn_lambda * neurons


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest scores (ties: the earlier index goes first)."""
    order = torch.sort(scores, stable=True).indices
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    pruned[order[:count]] = True
    return pruned


def draw_ticket(head_coefs, ffn_coefs, head_ratio: float = 1 / 3, ffn_ratio: float = 0.4,
                rank_by: str = "raw") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep-masks (True = keep), one bool tensor per layer for heads and for FFN neurons.

    Heads are ranked within each layer, neurons over all layers together. A layer left with no head (or no neuron)
    keeps its highest-ranked one, with a warning.
    """
    for name, ratio in (("head_ratio", head_ratio), ("ffn_ratio", ffn_ratio)):
        if not 0 <= ratio < 1:
            raise TicketError(f"{name} must be in [0, 1), got {ratio}")
    if rank_by not in ("raw", "abs"):
        raise TicketError(f"rank_by must be 'raw' or 'abs', got {rank_by!r}")
    rank = (lambda c: c.float().cpu()) if rank_by == "raw" else (lambda c: c.float().cpu().abs())  # noqa: E731
    head_keep = [~_lowest(rank(c), round(head_ratio * c.numel())) for c in head_coefs]
    flat = torch.cat([rank(c) for c in ffn_coefs])
    ffn_keep = list((~_lowest(flat, round(ffn_ratio * flat.numel()))).split([c.numel() for c in ffn_coefs]))
    for kind, keeps, coefs in (("head", head_keep, head_coefs), ("FFN neuron", ffn_keep, ffn_coefs)):
        for i, (keep, c) in enumerate(zip(keeps, coefs)):
            if not keep.any():
                keep[rank(c).argmax()] = True
                warnings.warn(f"the ticket would remove every {kind} of layer {i}; it keeps the highest-ranked one",
                              stacklevel=2)
    return head_keep, ffn_keep


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance of two bool masks of the same size: the fraction of units that differ."""
    return (a != b).float().mean().item()


class EarlyBird:
    """Feed it the ticket of each coefficient record (`update`); it says when the ticket has settled: the newest
    mask is within `threshold` of each of the `window - 1` masks before it."""

    def __init__(self, window: int = 5, threshold: float = 0.1):
        if window < 2:
            raise TicketError(f"the early-bird window must hold at least 2 masks, got {window}")
        if not 0 < threshold < 1:
            raise TicketError(f"the early-bird threshold must be in (0, 1), got {threshold}")
        self.window, self.threshold = window, threshold
        self.masks: list[torch.Tensor] = []

    def update(self, head_keep, ffn_keep) -> list[float]:
        """Record a ticket; returns its distances to the (up to window - 1) masks before it, oldest first."""
        mask = torch.cat([*(m.flatten() for m in head_keep), *(m.flatten() for m in ffn_keep)])
        self.masks = (self.masks + [mask])[-self.window:]
        return [mask_distance(mask, old) for old in self.masks[:-1]]

    @property
    def found(self) -> bool:
        if len(self.masks) < self.window:
            return False
        newest = self.masks[-1]
        return all(mask_distance(newest, old) < self.threshold for old in self.masks[:-1])

    def state_dict(self) -> dict:
        return {"window": self.window, "threshold": self.threshold, "masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict):
        self.window, self.threshold, self.masks = state["window"], state["threshold"], list(state["masks"])


def _as_layer_masks(masks, sizes: list[int], name: str) -> list[torch.Tensor]:
    """A (layers, units) bool tensor or a list of per-layer bool vectors -> per-layer bool vectors, checked."""
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 2:
            raise TicketError(f"{name} must be (layers, units), got shape {tuple(masks.shape)}")
        masks = list(masks)
    masks = list(masks)
    if len(masks) != len(sizes):
        raise TicketError(f"{name} has {len(masks)} layers, the model {len(sizes)}")
    for i, (m, size) in enumerate(zip(masks, sizes)):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TicketError(f"{name} must be bool (True = keep), got {getattr(m, 'dtype', type(m).__name__)}")
        if m.shape != (size,):
            raise TicketError(f"{name}[{i}] has shape {tuple(m.shape)}; layer {i} has {size}")
        if not m.any():
            raise TicketError(f"{name}[{i}] keeps nothing; a layer needs at least one")
    return [m.cpu() for m in masks]


def _cut(module: nn.Module, name: str, optimizer, rows=None, columns=None):
    """Replace the parameter module.<name> with its chosen rows (and, for a matrix, columns); in `optimizer` the cut
    parameter takes the old one's place and its per-element state (Adam's moments) cut the same way."""
    old = getattr(module, name)

    def take(t):
        t = t[rows.to(t.device)] if rows is not None else t
        return t[:, columns.to(t.device)] if columns is not None and t.dim() == 2 else t

    new = nn.Parameter(take(old.detach()).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                state = optimizer.state.pop(old, None)
                if state is not None:
                    optimizer.state[new] = {k: take(v) if torch.is_tensor(v) and v.shape == old.shape else v
                                            for k, v in state.items()}
                return
    raise TicketError("a parameter of the encoder layers is not in the optimizer; build the optimizer from "
                      "model.parameters() before pruning")


def prune(model, head_mask, ffn_mask, optimizer=None):
    """Keep only the masked-in heads and FFN neurons of every layer, cutting the weights in place; returns the
    model (a DDP model comes back re-wrapped).

    head_mask: (layers, heads) bool or one bool vector per layer; ffn_mask likewise; True = keep. With `optimizer`,
    training continues: the cut parameters replace the old ones in it and keep their state for the kept units (the
    pre-training setting of EarlyBERT); without, a new optimizer must be built for the pruned model.
    """
    module = unwrap(model)
    layers = encoder_layers(module)
    head_keep = _as_layer_masks(head_mask, [layer.attention.heads for layer in layers], "head_mask")
    ffn_keep = _as_layer_masks(ffn_mask, [layer.intermediate.out_features for layer in layers], "ffn_mask")
    for layer, heads, neurons in zip(layers, head_keep, ffn_keep):
        attention, d = layer.attention, layer.attention.head_dim
        kept = torch.nonzero(heads).flatten()
        channels = (kept[:, None] * d + torch.arange(d)).flatten()  # the kept heads' columns of the projection
        qkv_rows = torch.cat([part * attention.heads * d + channels for part in range(3)])
        for name in ("weight", "bias"):
            _cut(attention.qkv, name, optimizer, rows=qkv_rows)
        _cut(attention.proj, "weight", optimizer, columns=channels)
        if attention.head_scale is not None:
            _cut(attention, "head_scale", optimizer, rows=kept)
        attention.heads = len(kept)
        attention.qkv.out_features, attention.proj.in_features = len(qkv_rows), len(channels)

        rows = torch.nonzero(neurons).flatten()
        for name in ("weight", "bias") + (("neuron_scale",) if layer.intermediate.neuron_scale is not None else ()):
            _cut(layer.intermediate, name, optimizer, rows=rows)
        _cut(layer.output, "weight", optimizer, columns=rows)
        layer.intermediate.out_features = layer.output.in_features = len(rows)
    heads = [layer.attention.heads for layer in layers]
    ffn = [layer.intermediate.out_features for layer in layers]
    for config in configs_of(module):
        config.heads_per_layer, config.intermediate_size_per_layer = list(heads), list(ffn)
    return rewrap_ddp(model) if isinstance(model, DistributedDataParallel) else model


def prune_to_sizes(model, heads_per_layer: list[int], intermediate_size_per_layer: list[int], optimizer=None):
    """Prune to the given per-layer sizes, keeping the first units of each layer: for a model whose weights are
    loaded (or initialised) afterwards, where only the shapes matter."""
    layers = encoder_layers(model)
    heads = [torch.arange(layer.attention.heads) < n for layer, n in zip(layers, heads_per_layer)]
    neurons = [torch.arange(layer.intermediate.out_features) < n
               for layer, n in zip(layers, intermediate_size_per_layer)]
    return prune(model, heads, neurons, optimizer)
