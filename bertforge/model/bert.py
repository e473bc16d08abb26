"""BERT on bertforge's fused ops: Hugging Face BERT's math (post-LN), laid out for speed.

- One fused QKV projection per layer; attention, residual + LayerNorm and bias + GELU are bertforge kernels.
- With an attention_mask, only real tokens run through the network: they are gathered right after the input
  ids, every layer works on (total_tokens, hidden) with varlen attention, and the last hidden state is
  scattered back to (batch, seq, hidden) at the end (zeros at padding).
- The MLM head computes logits only where labels != IGNORE_INDEX when labels are given (sparse prediction).
- Given a TokenPacking and label_positions built on the CPU by the collator (packing.py), the model's own code
  reads no device values in forward or backward, so the GPU need not wait on the host; its value checks then run
  on device tensors only under BERTFORGE_DEBUG=1.

Hugging Face checkpoints load and save through `from_pretrained` / `save_pretrained` (see convert.py).
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from bertforge.kernels import Dropout, attention_qkvpacked, bias_gelu, checks_values, layer_norm, linear_cross_entropy
from bertforge.kernels.padding import pad

from . import convert
from .config import GELU_APPROXIMATE, BertConfig
from .packing import IGNORE_INDEX, TokenPacking, mlm_label_positions


@dataclasses.dataclass
class BertModelOutput:
    """What the forward of every model here returns (BertModel and the task heads); fields that do not apply
    are None. (Not Hugging Face's BertOutput, which is the feed-forward sublayer.)"""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None  # (batch, seq, hidden)
    pooler_output: torch.Tensor | None = None  # (batch, hidden)


@dataclasses.dataclass
class Layout:
    """How the rows of a (tokens, hidden) activation form sequences.

    Packed: cu_seqlens (batch+1,) int32 offsets of each sequence's real tokens; attention runs varlen.
    Dense: the rows are a (batch, seqlen) grid; key_padding_mask (batch, seqlen) bool marks real tokens, or None.
    """

    batch: int
    seqlen: int
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    key_padding_mask: torch.Tensor | None = None


class ResidualLayerNorm(nn.LayerNorm):
    """LN(dropout(x) + residual) by the fused kernel, with nn.LayerNorm's parameters (and state-dict names).

    Under autocast a sublayer's output is bf16/fp16 while the residual stream stays in the embeddings' fp32, as in
    Hugging Face where `hidden + input` promotes: the kernel reads each in its own dtype and writes the stream's.
    """

    def forward(self, x, residual=None, dropout_p=0.0):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, dropout_p=dropout_p)


class LinearGELU(nn.Linear):
    """GELU(x W^T + b): the matmul runs without its bias, which the fused GELU kernel adds instead. With
    slimming, the kernel also scales each output neuron by a learnable coefficient (EarlyBERT), initialised to 1."""

    def __init__(self, in_features, out_features, approximate="none", slimming=False):
        super().__init__(in_features, out_features)
        self.approximate = approximate
        self.neuron_scale = nn.Parameter(torch.ones(out_features)) if slimming else None

    def forward(self, x):
        return bias_gelu(F.linear(x, self.weight), self.bias, self.approximate, self.neuron_scale)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.norm = ResidualLayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, position_ids, token_type_ids):
        """Ids of any one shape (...) -> (..., hidden)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x, residual=self.position_embeddings(position_ids)))


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: one fused QKV projection, the attention kernel, the output projection."""

    def __init__(self, hidden_size, heads, head_dim, dropout_p, slimming=False):
        super().__init__()
        self.heads, self.head_dim, self.dropout_p = heads, head_dim, dropout_p
        # Rows of the fused weight are [W_query; W_key; W_value], each (heads * head_dim, hidden).
        self.qkv = nn.Linear(hidden_size, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, hidden_size)
        # EarlyBERT: each head's output scaled before the output projection (= scaling its attention probabilities).
        self.head_scale = nn.Parameter(torch.ones(heads)) if slimming else None

    def forward(self, x, layout: Layout):
        dropout_p = self.dropout_p if self.training else 0.0
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim))  # (tokens, 3, heads, head_dim)
        # One fused QKV tensor in, one gradient buffer for it out (no stack of dq, dk, dv in the backward).
        if layout.cu_seqlens is not None:
            y = attention_qkvpacked(qkv, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen,
                                    dropout_p=dropout_p)  # (tokens, heads, head_dim)
        else:
            y = attention_qkvpacked(qkv.unflatten(0, (layout.batch, layout.seqlen)), dropout_p=dropout_p,
                                    key_padding_mask=layout.key_padding_mask)  # (batch, seq, heads, head_dim)
        if self.head_scale is not None:  # y: (..., heads, head_dim) in both layouts
            y = y * self.head_scale.to(y.dtype)[:, None]
        return self.proj(y.reshape(x.shape[0], self.heads * self.head_dim))


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)). Holds only its own parameters."""

    def __init__(self, config: BertConfig, index: int):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        heads, ffn = config.layer_heads(index), config.layer_intermediate_size(index)
        self.attention = BertSelfAttention(h, heads, config.head_dim, config.attention_probs_dropout_prob,
                                           config.slimming)
        self.attention_norm = ResidualLayerNorm(h, eps=eps)
        self.intermediate = LinearGELU(h, ffn, GELU_APPROXIMATE[config.hidden_act], config.slimming)
        self.output = nn.Linear(ffn, h)
        self.output_norm = ResidualLayerNorm(h, eps=eps)
        self.hidden_dropout_p = config.hidden_dropout_prob

    def forward(self, x, layout: Layout):
        # Each sublayer's dropout, residual add and LayerNorm are one kernel.
        p = self.hidden_dropout_p if self.training else 0.0
        x = self.attention_norm(self.attention(x, layout), residual=x, dropout_p=p)
        return self.output_norm(self.output(self.intermediate(x)), residual=x, dropout_p=p)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, x, layout: Layout):
        for layer in self.layers:
            x = layer(x, layout)
        return x


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b): the first token's final hidden state, projected."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, last_hidden_state):
        return torch.tanh(self.dense(last_hidden_state[:, 0]))


class BertMLMHead(nn.Module):
    """LN(GELU(dense(h))), then the decoder: the word-embedding matrix (tied, passed in) plus an output bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = LinearGELU(config.hidden_size, config.hidden_size, GELU_APPROXIMATE[config.hidden_act])
        self.norm = ResidualLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def transform(self, h):
        return self.norm(self.dense(h))

    def forward(self, h, decoder_weight):
        return F.linear(self.transform(h), decoder_weight, self.bias)

    def loss(self, h, decoder_weight, targets):
        """Mean cross-entropy of the decoder's logits for rows h against targets, without keeping the logits."""
        return linear_cross_entropy(self.transform(h), decoder_weight, self.bias, targets)


def init_weights(module: nn.Module, std: float):
    """Hugging Face BERT's initialisation: N(0, std) weights, zero biases and padding row, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                nn.init.zeros_(m.weight[m.padding_idx])
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, BertMLMHead):
            nn.init.zeros_(m.bias)


def check_inputs(config: BertConfig, input_ids, attention_mask=None, token_type_ids=None, packing=None):
    """Raise ValueError naming what is wrong with a batch; return (batch, seq).

    Shapes, dtypes and devices are always checked; values only where `checks_values` allows (CPU tensors, or
    BERTFORGE_DEBUG=1), since reading a GPU tensor's values makes the host wait for the device.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got {got}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"input_ids is empty: shape {(batch, seq)}")
    if seq > config.max_position_embeddings:
        raise ValueError(f"sequence length {seq} exceeds max_position_embeddings = {config.max_position_embeddings}")
    _check_like("attention_mask", attention_mask, input_ids)
    _check_like("token_type_ids", token_type_ids, input_ids)
    if packing is not None:
        if not isinstance(packing, TokenPacking):
            raise ValueError(f"packing must be a TokenPacking, got {type(packing).__name__}")
        if attention_mask is None:
            raise ValueError("packing given without attention_mask; pass the mask it was built from")
        packing.check_layout(batch, seq, input_ids.device)
    if not _reads_values(input_ids):
        return batch, seq
    _check_range("input_ids", input_ids, config.vocab_size, "vocab_size")
    if token_type_ids is not None:
        _check_range("token_type_ids", token_type_ids, config.type_vocab_size, "type_vocab_size")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 and 1 (or be bool)")
    if packing is not None:
        packing.check_matches(attention_mask)
    return batch, seq


def check_mlm_labels(config: BertConfig, labels, input_ids, attention_mask=None, label_positions=None):
    """Labels (batch, seq): a token id where there is an MLM target, IGNORE_INDEX elsewhere (padding included).
    label_positions, if given, must be mlm_label_positions(labels)."""
    _check_like("labels", labels, input_ids)
    if label_positions is not None:
        if not isinstance(label_positions, torch.Tensor) or label_positions.dtype != torch.int64 \
                or label_positions.dim() != 1:
            got = (f"{label_positions.dtype} of shape {tuple(label_positions.shape)}"
                   if isinstance(label_positions, torch.Tensor) else type(label_positions).__name__)
            raise ValueError(f"label_positions must be a 1-D int64 tensor, got {got}")
        if label_positions.device != labels.device:
            raise ValueError(f"label_positions is on {label_positions.device}, labels on {labels.device}")
        if label_positions.numel() > labels.numel():
            raise ValueError(f"label_positions has {label_positions.numel()} entries, more than labels' "
                             f"{labels.numel()} positions")
    if not _reads_values(labels):
        return
    labelled = labels != IGNORE_INDEX
    _check_range("labels", labels[labelled], config.vocab_size, "vocab_size", f" (or {IGNORE_INDEX} = no target)")
    if attention_mask is not None and bool((labelled & (attention_mask == 0)).any()):
        raise ValueError(f"labels given at padding positions (attention_mask == 0); use {IGNORE_INDEX} there")
    if label_positions is not None and not torch.equal(label_positions, mlm_label_positions(labels)):
        raise ValueError("label_positions does not match labels; build it with mlm_label_positions(labels)")


def _reads_values(t) -> bool:
    """Whether value checks may read `t`: not while compiling (a graph break), not on a GPU unless debugging."""
    return not torch.compiler.is_compiling() and checks_values(t)


def _check_like(name, t, input_ids):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
    if t.device != input_ids.device:
        raise ValueError(f"{name} is on {t.device}, input_ids on {input_ids.device}")


def _check_range(name, t, high, high_name, note=""):
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= high):
        bad = t[(t < 0) | (t >= high)]
        raise ValueError(f"{name} out of range: got {int(bad[0])}, but values must be in [0, {high_name} = {high})"
                         + note)


class BertPreTrainedModel(nn.Module):
    """Shared by the models: Hugging Face checkpoint loading and saving (see convert.py)."""

    hf_architecture = None  # the transformers class that loads what save_pretrained writes
    base_prefix = "bert."  # where the BertModel sits in this model's state dict

    @classmethod
    def from_pretrained(cls, path, **config_overrides):
        """Load a Hugging Face BERT folder (config.json + model.safetensors or pytorch_model.bin)."""
        return convert.load_pretrained(cls, path, **config_overrides)

    def save_pretrained(self, path):
        """Write config.json + model.safetensors in Hugging Face's layout (transformers loads it)."""
        convert.save_pretrained(self, path)


class BertModel(BertPreTrainedModel):
    """Embeddings -> encoder.layers -> pooler; forward returns a BertModelOutput."""

    hf_architecture = "BertModel"
    base_prefix = ""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        # False runs padding through every layer as Hugging Face does (same results on real tokens, slower).
        self.unpad = True
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, packing: TokenPacking | None = None):
        """packing: TokenPacking.from_attention_mask(attention_mask), built on the CPU; without it the forward
        computes it here, which on a GPU waits for the device to read the mask."""
        batch, seq = check_inputs(self.config, input_ids, attention_mask, token_type_ids, packing)
        positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        ids = torch.stack((input_ids, positions, types.to(input_ids.dtype)), dim=-1)  # (batch, seq, 3)
        if attention_mask is not None and self.unpad:
            if packing is None:
                packing = TokenPacking.from_attention_mask(attention_mask)
            # Gather the real tokens before the embeddings; positions keep their place in the padded row.
            ids = ids.flatten(0, 1).index_select(0, packing.indices)
            layout = Layout(batch, seq, cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
        else:
            mask = attention_mask.bool() if attention_mask is not None else None
            ids, layout = ids.flatten(0, 1), Layout(batch, seq, key_padding_mask=mask)
        x = self.encoder(self.embeddings(*ids.unbind(-1)), layout)
        x = pad(x, packing.indices, batch, seq) if layout.cu_seqlens is not None else x.view(batch, seq, -1)
        pooled = self.pooler(x) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled)


class BertForMaskedLM(BertPreTrainedModel):
    """BertModel (no pooler) + MLM head with the decoder tied to the word embeddings.

    With labels: the mean cross-entropy over positions whose label is not IGNORE_INDEX, and no logits (the
    decoder runs on those positions only and reduces its logits to the loss as it goes: see
    `bertforge.kernels.linear_cross_entropy`); a batch without any labelled position has loss 0 (zero gradients).
    Without labels: logits (batch, seq, vocab).
    """

    hf_architecture = "BertForMaskedLM"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.head = BertMLMHead(config)
        init_weights(self.head, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                packing: TokenPacking | None = None, label_positions: torch.Tensor | None = None):
        """label_positions: mlm_label_positions(labels), built on the CPU; without it the forward finds the
        labelled positions here, which on a GPU waits for the device. packing: see BertModel.forward."""
        if labels is None and label_positions is not None:
            raise ValueError("label_positions given without labels")
        out = self.bert(input_ids, attention_mask, token_type_ids, packing)
        h, decoder = out.last_hidden_state, self.bert.embeddings.word_embeddings.weight
        if labels is None:
            return BertModelOutput(logits=self.head(h, decoder), last_hidden_state=h)
        check_mlm_labels(self.config, labels, input_ids, attention_mask, label_positions)
        if label_positions is None:
            label_positions = mlm_label_positions(labels)
        # Sparse prediction: only the labelled ~15% of positions go through the vocabulary-sized decoder, whose
        # logits are reduced to the loss chunk by chunk and not returned. No labelled position gives loss 0 and
        # zero gradients (cross-entropy's mean over nothing would be NaN and poison the weights).
        targets = labels.flatten().index_select(0, label_positions)
        loss = self.head.loss(h.flatten(0, 1).index_select(0, label_positions), decoder, targets)
        return BertModelOutput(loss=loss, last_hidden_state=h)


def classification_loss(logits, labels, problem_type=None):
    """Hugging Face's choice: MSE for one output, cross-entropy for integer labels, BCE for float multi-labels."""
    if problem_type is None:
        if logits.shape[-1] == 1:
            problem_type = "regression"
        elif labels.is_floating_point():
            problem_type = "multi_label_classification"
        else:
            problem_type = "single_label_classification"
    if problem_type == "regression":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class BertForSequenceClassification(BertPreTrainedModel):
    """BertModel + dropout + a linear classifier on the pooled [CLS] output; logits (batch, num_labels)."""

    hf_architecture = "BertForSequenceClassification"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.classifier, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                packing: TokenPacking | None = None):
        out = self.bert(input_ids, attention_mask, token_type_ids, packing)
        logits = self.classifier(self.dropout(out.pooler_output))
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:1] != logits.shape[:1]):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels must have batch size {logits.shape[0]} first, got {got}")
        loss = classification_loss(logits, labels, self.config.problem_type) if labels is not None else None
        return BertModelOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state,
                          pooler_output=out.pooler_output)
