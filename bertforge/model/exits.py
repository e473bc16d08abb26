"""Multi-exit BERT: a classifier after every encoder layer, and early exit at inference (papers.md 2, 4 and 5).

Layouts of the exits of layers 1..L-1 (the last layer's exit is always the model's own pooler + `classifier`,
named as in BertForSequenceClassification):
    per_exit_pooler  DeeBERT / RomeBERT: each its own pooler (a copy of the checkpoint's) -> dropout -> Linear
    shared_pooler    PABEE: the model's pooler for every layer -> dropout -> a Linear per layer

What an exit of layers 1..L-1 reads (exit_pooling; the final exit always reads [CLS], as BERT does):
    cls   the layer's [CLS] row, as DeeBERT, PABEE and RomeBERT do
    mean  the mean of the layer's real token rows, for checkpoints whose [CLS] carries nothing below the last
          layer: in the MiniLM sentence-embedding checkpoint (trained with mean pooling) the [CLS] row of layers
          1-5 is almost the same for every input (spread over inputs 0.001 against 0.2 at layer 6), so
          [CLS]-reading exits there stay at the majority class

A saved MultiExitBert is a BertForSequenceClassification folder plus its exits (under "exits.", which transformers
ignores) and "exit_layout" / "exit_pooling" in config.json, so transformers loads it as a plain classifier: the
final exit.

early_exit runs a batch layer by layer and takes each sample out as soon as its exit is sure enough; the rows left
running are gathered into a smaller packed batch, so the deeper layers do less work. pooled_early_exit keeps each
layer's batch full by taking in new requests as others leave.
"""

import collections
import copy
import dataclasses
import itertools
import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import convert
from .bert import (
    BertForSequenceClassification,
    BertModelOutput,
    Layout,
    _reads_values,
    check_inputs,
    classification_loss,
    init_weights,
)
from .config import BertConfig
from .packing import TokenPacking

LAYOUTS = ("per_exit_pooler", "shared_pooler")
EXIT_POOLINGS = ("cls", "mean")
CRITERIA = ("entropy", "confidence", "patience")


@dataclasses.dataclass
class MultiExitOutput(BertModelOutput):
    """logits and loss are the final exit's, as BertForSequenceClassification's."""

    exit_logits: list[torch.Tensor] | None = None  # (batch, num_labels) per layer, first to last


@dataclasses.dataclass
class EarlyExitOutput:
    predictions: torch.Tensor  # (batch,) int64: argmax of each sample's exit logits
    exit_layers: torch.Tensor  # (batch,) int64: the layer, 1..L, whose exit each sample took
    logits: torch.Tensor  # (batch, num_labels): each sample's exit logits


class Exit(nn.Module):
    """One layer's exit: its own pooler (None: the model's, shared) and its classifier."""

    def __init__(self, pooler: nn.Module | None, classifier: nn.Linear):
        super().__init__()
        self.pooler, self.classifier = pooler, classifier


class MultiExitBert(BertForSequenceClassification):
    """BertForSequenceClassification with an exit after every encoder layer; forward returns every exit's logits.

    The encoder always runs in the unpadded layout. Batches must be right-padded ([CLS] first), as BERT
    tokenizers make them.
    """

    def __init__(self, config: BertConfig, layout: str = "per_exit_pooler", exit_pooling: str = "cls"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if exit_pooling not in EXIT_POOLINGS:
            raise ValueError(f"exit_pooling must be one of {EXIT_POOLINGS}, got {exit_pooling!r}")
        super().__init__(config)
        self.layout, self.exit_pooling = layout, exit_pooling
        own_pooler = layout == "per_exit_pooler"
        self.exits = nn.ModuleList(
            Exit(copy.deepcopy(self.bert.pooler) if own_pooler else None,
                 nn.Linear(config.hidden_size, config.num_labels))
            for _ in range(config.num_hidden_layers - 1))
        for e in self.exits:
            init_weights(e.classifier, config.initializer_range)

    def exit_heads(self) -> list[tuple[nn.Module, nn.Linear]]:
        """(pooler, classifier) of each layer's exit, first to last; the last is the model's own."""
        depth = len(self.bert.encoder.layers)
        if len(self.exits) != depth - 1:
            raise ValueError(f"{len(self.exits)} exits for {depth} layers: grow the model with "
                             "bertforge.model.growth.stack, which gives new layers their exits")
        shared = self.bert.pooler
        heads = [(e.pooler if e.pooler is not None else shared, e.classifier) for e in self.exits]
        return heads + [(shared, self.classifier)]

    def classify(self, head, x: torch.Tensor, layout: Layout, final: bool) -> torch.Tensor:
        """One exit's logits (batch, num_labels) from its layer's packed rows x (tokens, hidden)."""
        pooler, classifier = head
        rows = cls_rows(x, layout) if final or self.exit_pooling == "cls" else mean_rows(x, layout)
        return classifier(self.dropout(pooler(rows[:, None])))  # the pooler reads position 0 of a sequence

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, packing: TokenPacking | None = None,
                labels=None):
        """packing: see BertModel.forward. With labels, loss is the final exit's (the multi-exit training losses
        combine exit_logits: bertforge.train.finetune)."""
        x, layout = embed(self.bert, input_ids, attention_mask, token_type_ids, packing)
        exit_logits, heads = [], self.exit_heads()
        for i, (layer, head) in enumerate(zip(self.bert.encoder.layers, heads)):
            x = layer(x, layout)
            exit_logits.append(self.classify(head, x, layout, final=i == len(heads) - 1))
        logits = exit_logits[-1]
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:1] != logits.shape[:1]):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have batch size {logits.shape[0]} first, got {got}")
        loss = classification_loss(logits, labels, self.config.problem_type) if labels is not None else None
        return MultiExitOutput(loss=loss, logits=logits, exit_logits=exit_logits)

    def stack_exits(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Called by growth.stack once the encoder has doubled from L to 2L layers: layer L+i gets a copy of
        layer i's exit (i < L-1); the old last layer gets a copy of the final exit, which stays the last layer's.
        Returns (source, copy) parameter pairs, for the optimizer."""
        if len(self.bert.encoder.layers) != 2 * (len(self.exits) + 1):
            raise ValueError(f"stack_exits: {len(self.exits) + 1} exits, but {len(self.bert.encoder.layers)} "
                             "layers is not twice as many")
        final = Exit(self.bert.pooler if self.layout == "per_exit_pooler" else None, self.classifier)
        sources = list(self.exits) + [final]  # layer i's exit, i = 0..L-1
        copies = [copy.deepcopy(e) for e in sources]
        pairs = []
        for source, new in zip(sources, copies):
            for p, q in zip(source.parameters(), new.parameters()):
                q.grad = None
                pairs.append((p, q))
        self.exits.extend([copies[-1]] + copies[:-1])
        return pairs

    @classmethod
    def from_pretrained(cls, path, layout: str | None = None, exit_pooling: str | None = None, **config_overrides):
        """A MultiExitBert saved by save_pretrained (layout, exit_pooling None = the saved ones), or any Hugging Face
        BERT folder: then new exits, per-exit poolers copied from the checkpoint's pooler, classifiers fresh
        (None = per_exit_pooler, cls). config_overrides replace config.json fields (e.g. num_labels)."""
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no config.json in {path}")
        config = BertConfig.from_json_file(path / "config.json", **config_overrides)  # also checks the JSON
        fields = json.loads((path / "config.json").read_text(encoding="utf-8"))
        saved = fields.get("exit_layout")
        if saved is not None and layout is not None and layout != saved:
            raise ValueError(f"{path} holds a {saved!r} multi-exit model, not {layout!r}")
        saved_pooling = fields.get("exit_pooling", "cls" if saved else None)
        if saved_pooling is not None and exit_pooling is not None and exit_pooling != saved_pooling:
            raise ValueError(f"{path} holds a model whose exits read {saved_pooling!r}, not {exit_pooling!r}")
        model = cls(config, layout or saved or "per_exit_pooler", exit_pooling or saved_pooling or "cls")
        state = convert.read_checkpoint(path)
        if saved is None:
            warnings.warn(f"{path} has no exits: new ones, classifiers initialised at random"
                          + (", poolers copied from its pooler" if model.layout == "per_exit_pooler" else ""),
                          stacklevel=2)
            state.update({f"exits.{k}": v for k, v in model.exits.state_dict().items()})
        try:
            convert.load_hf_state_dict(model, state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if saved is None and model.layout == "per_exit_pooler":
            for e in model.exits:
                e.pooler.load_state_dict(model.bert.pooler.state_dict())
        return model

    def save_pretrained(self, path):
        """BertForSequenceClassification's folder plus the exits; config.json records the layout (transformers
        keeps the extra key as an attribute, BertConfig ignores it)."""
        super().save_pretrained(path)
        config_file = Path(path) / "config.json"
        d = json.loads(config_file.read_text(encoding="utf-8"))
        d["exit_layout"], d["exit_pooling"] = self.layout, self.exit_pooling
        config_file.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def embed(bert, input_ids, attention_mask=None, token_type_ids=None, packing: TokenPacking | None = None):
    """BertModel.forward up to the encoder, in the unpadded layout: the embedded real tokens (tokens, hidden) and
    their Layout. Without a mask every token is real."""
    batch, seq = check_inputs(bert.config, input_ids, attention_mask, token_type_ids, packing)
    if attention_mask is not None and _reads_values(attention_mask) and not bool(attention_mask[:, 0].all()):
        raise ValueError("every sequence must start with a real token ([CLS]): attention_mask[:, 0] must be 1 "
                         "(right padding)")
    if packing is None:  # all-real without a mask: built on the CPU, no device read
        mask = attention_mask if attention_mask is not None else torch.ones(batch, seq, dtype=torch.bool)
        packing = TokenPacking.from_attention_mask(mask).to(input_ids.device)
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
    ids = torch.stack((input_ids, positions, types.to(input_ids.dtype)), dim=-1)  # (batch, seq, 3)
    ids = ids.flatten(0, 1).index_select(0, packing.indices)  # as BertModel: gather before embedding
    return bert.embeddings(*ids.unbind(-1)), Layout(batch, seq, cu_seqlens=packing.cu_seqlens,
                                                    max_seqlen=packing.max_seqlen)


def cls_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Each sequence's first token (batch, hidden) from packed rows (tokens, hidden)."""
    return x.index_select(0, layout.cu_seqlens[:-1])


def mean_rows(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Each sequence's mean over its tokens (batch, hidden) from packed rows (tokens, hidden)."""
    lengths = layout.cu_seqlens.diff()
    owner = torch.repeat_interleave(torch.arange(layout.batch, device=x.device), lengths, output_size=x.shape[0])
    sums = x.new_zeros(layout.batch, x.shape[1]).index_add_(0, owner, x)
    return sums / lengths[:, None].to(x.dtype)


@torch.no_grad()
def early_exit(model: MultiExitBert, input_ids, attention_mask=None, token_type_ids=None, *, criterion: str,
               threshold: float | None = None, patience: int | None = None,
               packing: TokenPacking | None = None) -> EarlyExitOutput:
    """Each sample leaves at the first layer whose exit meets the criterion; those still running at the last
    layer leave there.

        entropy     Shannon entropy of softmax(logits) < threshold (>= 0; DeeBERT, RomeBERT)
        confidence  largest softmax probability >= threshold (in (0, 1])
        patience    PABEE: leave once `patience` layers in a row predicted what the layer before them did (so
                    the earliest exit is layer patience + 1); patience 0 = the last layer

    The sequences that left are taken out of the packed batch, so deeper layers run only the remaining tokens.
    One host read per layer but the last (how many left, and the size of what remains). Needs model.eval().
    """
    limit = _check_rule(model, criterion, threshold, patience)
    depth = len(model.bert.encoder.layers)
    x, layout = embed(model.bert, input_ids, attention_mask, token_type_ids, packing)
    rows = torch.arange(layout.batch, device=x.device)  # the batch index of each running sequence
    out_logits = x.new_empty(layout.batch, model.config.num_labels)
    out_layers = torch.empty_like(rows)
    previous, streak = torch.full_like(rows, -1), torch.zeros_like(rows)  # patience: last argmax, agreeing run
    for i, (layer, head) in enumerate(zip(model.bert.encoder.layers, model.exit_heads())):
        x = layer(x, layout)
        logits = model.classify(head, x, layout, final=i == depth - 1)
        lengths = layout.cu_seqlens.diff()
        if i < depth - 1:
            done, previous, streak = _leaves(criterion, limit, logits, previous, streak)
            left = torch.where(done, 0, lengths)
            n_done, tokens_left, longest_left = torch.stack((done.sum(), left.sum(), left.max())).tolist()
        else:
            done, n_done = torch.ones_like(rows, dtype=torch.bool), len(rows)
        # Sizes known on the host, nonzero_static finds positions without another device read.
        exited = torch.nonzero_static(done, size=n_done).squeeze(1)
        out_logits.index_copy_(0, rows[exited], logits[exited].to(out_logits.dtype))
        out_layers.index_fill_(0, rows[exited], i + 1)
        if n_done == len(rows):
            break
        kept = torch.nonzero_static(~done, size=len(rows) - n_done).squeeze(1)
        token_kept = (~done).repeat_interleave(lengths, output_size=x.shape[0])
        x = x.index_select(0, torch.nonzero_static(token_kept, size=tokens_left).squeeze(1))
        cu_seqlens = F.pad(left[kept].cumsum(0, dtype=torch.int32), (1, 0))
        layout = Layout(len(kept), layout.seqlen, cu_seqlens=cu_seqlens, max_seqlen=longest_left)
        rows, previous, streak = rows[kept], previous[kept], streak[kept]
    return EarlyExitOutput(predictions=out_logits.argmax(-1), exit_layers=out_layers, logits=out_logits)


def _leaves(criterion, limit, logits, previous, streak):
    """Which running rows leave at this layer, and the patience criterion's new (argmax, streak)."""
    if criterion == "patience":
        prediction = logits.argmax(-1)
        streak = torch.where(prediction == previous, streak + 1, 0)
        done = streak >= limit if limit > 0 else torch.zeros_like(prediction, dtype=torch.bool)
        return done, prediction, streak
    log_p = F.log_softmax(logits.float(), dim=-1)  # stable: no exp of raw logits
    if criterion == "entropy":
        return -(log_p.exp() * log_p).sum(-1) < limit, previous, streak
    return log_p.amax(-1).exp() >= limit, previous, streak


def _check_rule(model, criterion, threshold, patience):
    """ValueError for a model or rule early_exit cannot run; returns the rule's threshold or patience."""
    if not isinstance(model, MultiExitBert):
        raise ValueError(f"early exit needs a MultiExitBert, got {type(model).__name__}")
    if model.training:
        raise ValueError("early exit needs model.eval(): dropout would make the exits random")
    if model.config.num_labels < 2:
        raise ValueError(f"early exit needs a classifier (num_labels >= 2), got num_labels = {model.config.num_labels}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    depth = len(model.bert.encoder.layers)
    if criterion == "patience":
        if threshold is not None:
            raise ValueError("threshold is for the entropy and confidence criteria; the patience criterion takes "
                             "patience=")
        if patience is None:
            raise ValueError("criterion 'patience' needs patience=<layers>")
        if not isinstance(patience, int) or isinstance(patience, bool) or not 0 <= patience < depth:
            raise ValueError(f"patience must be an int in [0, {depth}) for a {depth}-layer model, got {patience!r}")
        return patience
    if patience is not None:
        raise ValueError(f"patience is for criterion 'patience', not {criterion!r}")
    if threshold is None:
        raise ValueError(f"criterion {criterion!r} needs a threshold")
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if criterion == "entropy" and not (number and threshold >= 0):
        raise ValueError(f"entropy threshold must be a number >= 0, got {threshold!r}")
    if criterion == "confidence" and not (number and 0 < threshold <= 1):
        raise ValueError(f"confidence threshold must be a number in (0, 1], got {threshold!r}")
    return threshold


@dataclasses.dataclass
class _Waiting:
    """A request between layers: its hidden states (tokens, hidden) and the patience rule's 0-d device state."""

    index: int
    hidden: torch.Tensor
    previous: torch.Tensor
    streak: torch.Tensor


def pooled_early_exit(model: MultiExitBert, requests, batch_size: int, *, criterion: str,
                      threshold: float | None = None, patience: int | None = None):
    """Early exit over a stream of requests (1-D input_ids tensors, [CLS] first), with a pool of waiting sequences
    per layer. A layer runs when its pool holds batch_size sequences (the deepest such layer first), so while
    requests keep coming every layer works on full batches: those that leave are replaced by those behind them.
    Once the stream ends, what is left runs from the shallowest pool down, merging as it goes.

    Returns an iterator of (request index, prediction, exit layer 1..L), in the order requests leave; each is what
    early_exit gives that request alone. One host read per layer run.
    """
    limit = _check_rule(model, criterion, threshold, patience)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return _serve_pools(model, enumerate(requests), batch_size, criterion, limit)


@torch.no_grad()
def _serve_pools(model, requests, batch_size, criterion, limit):
    layers, heads = model.bert.encoder.layers, model.exit_heads()
    pools = [collections.deque() for _ in layers]  # pools[l]: sequences waiting for layer l
    more = True
    while True:
        while more and len(pools[0]) < batch_size:
            index, ids = next(requests, (None, None))
            more = index is not None
            if more:
                pools[0].append(_admit(model, index, ids))
        full = [l for l, pool in enumerate(pools) if len(pool) >= batch_size]
        waiting = [l for l, pool in enumerate(pools) if pool]
        if not waiting:
            return
        l = full[-1] if full else waiting[0]
        batch = [pools[l].popleft() for _ in range(min(batch_size, len(pools[l])))]
        lengths = [len(s.hidden) for s in batch]
        device = batch[0].hidden.device
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)  # built on the host
        layout = Layout(len(batch), max(lengths), cu_seqlens=cu_seqlens.to(device, non_blocking=True),
                        max_seqlen=max(lengths))
        x = layers[l](torch.cat([s.hidden for s in batch]), layout)
        logits = model.classify(heads[l], x, layout, final=l == len(layers) - 1)
        previous, streak = torch.stack([s.previous for s in batch]), torch.stack([s.streak for s in batch])
        if l < len(layers) - 1:
            done, previous, streak = _leaves(criterion, limit, logits, previous, streak)
        else:
            done = torch.ones_like(previous, dtype=torch.bool)
        done_list, predictions = torch.stack((done.long(), logits.argmax(-1))).tolist()  # the host read
        for i, (s, hidden) in enumerate(zip(batch, x.split(lengths))):
            if done_list[i]:
                yield s.index, predictions[i], l + 1
            else:
                pools[l + 1].append(_Waiting(s.index, hidden, previous[i], streak[i]))


def _admit(model, index, ids) -> _Waiting:
    """A new request, embedded: it waits for layer 1."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"request {index}: input_ids must be a 1-D tensor of token ids, got {got}")
    try:
        hidden, _ = embed(model.bert, ids[None])
    except ValueError as e:
        raise ValueError(f"request {index}: {e}") from e
    no_prediction = torch.full((), -1, device=ids.device)
    return _Waiting(index, hidden, previous=no_prediction, streak=torch.zeros_like(no_prediction))
