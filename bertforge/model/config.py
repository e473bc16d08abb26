"""BertConfig: the fields of a Hugging Face BERT `config.json`, plus per-layer sizes for pruned models."""

import dataclasses
import json
from pathlib import Path

# hidden_act -> the `approximate` argument of bertforge.kernels.bias_gelu
GELU_APPROXIMATE = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class BertConfig:
    """Shape and regularisation of a BERT encoder; defaults are bert-base-uncased's.

    heads_per_layer / intermediate_size_per_layer (lists of num_hidden_layers ints, or None = uniform) let
    pruned layers differ; head_dim is always hidden_size // num_attention_heads.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    num_labels: int = 2
    problem_type: str | None = None  # "regression", "single_label_classification", "multi_label_classification"
    id2label: dict | None = None
    heads_per_layer: list | None = None
    intermediate_size_per_layer: list | None = None
    slimming: bool = False  # EarlyBERT's learnable scale per attention head and per FFN neuron (slimming.py)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_heads(self, i: int) -> int:
        return self.heads_per_layer[i] if self.heads_per_layer is not None else self.num_attention_heads

    def layer_intermediate_size(self, i: int) -> int:
        sizes = self.intermediate_size_per_layer
        return sizes[i] if sizes is not None else self.intermediate_size

    def validate(self):
        """Raise ValueError naming the first field of a wrong type or an inconsistent value."""
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "type_vocab_size", "num_labels")
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.head_dim % 16 or not 16 <= self.head_dim <= 128:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads = {self.head_dim}; the attention kernel "
                             "needs a multiple of 16 between 16 and 128")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in GELU_APPROXIMATE:
            raise ValueError(f"hidden_act must be one of {sorted(GELU_APPROXIMATE)}, got {self.hidden_act!r}")
        if self.position_embedding_type != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {self.position_embedding_type!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            p = getattr(self, name)
            if p is not None and not (_is_number(p) and 0.0 <= p < 1.0):
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {p!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0:
                raise ValueError(f"BertConfig.{name} must be a positive number, got {value!r}")
        if not _is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id must be an int in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id!r}")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"unknown problem_type {self.problem_type!r}; one of {PROBLEM_TYPES}")
        if self.id2label is not None and not isinstance(self.id2label, dict):
            raise ValueError(f"BertConfig.id2label must be a dict {{index: label}}, got {self.id2label!r}")
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")
        if not isinstance(self.slimming, bool):
            raise ValueError(f"BertConfig.slimming must be true or false, got {self.slimming!r}")
        for name in ("heads_per_layer", "intermediate_size_per_layer"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if not isinstance(sizes, (list, tuple)) or len(sizes) != self.num_hidden_layers:
                raise ValueError(f"BertConfig.{name} must list one size per layer ({self.num_hidden_layers}), "
                                 f"got {sizes!r}")
            if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
                raise ValueError(f"BertConfig.{name} must hold positive ints, got {sizes!r}")
            setattr(self, name, list(sizes))

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """From a Hugging Face BERT config.json dict; ValueError for another architecture or a decoder config."""
        d = dict(d)
        if "model_type" not in d:
            raise ValueError('not a BERT config: no "model_type" field (a BERT config.json has "model_type": "bert")')
        model_type, architectures = d["model_type"], d.get("architectures") or []
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ValueError(f"architectures must be a list of class names, got {architectures!r}")
        if model_type != "bert" or any(not a.startswith("Bert") for a in architectures):
            raise ValueError(f"not a BERT config: model_type={model_type!r}, architectures={architectures!r}")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("decoder BERT configs (is_decoder / add_cross_attention) are not supported")
        if d.get("tie_word_embeddings") is False:
            raise ValueError("tie_word_embeddings=false is not supported: the MLM decoder is the word embedding")
        if d.get("id2label") is not None:
            labels = d["id2label"]
            if not isinstance(labels, dict) or not all(isinstance(k, int) or str(k).isdigit() for k in labels):
                raise ValueError(f"id2label must map class indices to names, got {labels!r}")
            d["id2label"] = {int(k): v for k, v in labels.items()}
            d.setdefault("num_labels", len(d["id2label"]))
        if d.get("pruned_heads"):
            raise ValueError("Hugging Face pruned_heads configs are not supported; bertforge stores pruned sizes "
                             "in heads_per_layer / intermediate_size_per_layer")
        # Other keys (use_cache, transformers_version, ...) describe generation or bookkeeping, not the encoder;
        # a key that did change the shapes would surface as a shape mismatch when the weights load.
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict:
        """A config.json dict that both bertforge and transformers read (per-layer lists only when set)."""
        d = dataclasses.asdict(self)
        for name in ("heads_per_layer", "intermediate_size_per_layer", "id2label", "classifier_dropout",
                     "problem_type"):
            if d[name] is None:
                del d[name]
        if not self.slimming:  # a plain BERT's config.json stays as transformers writes it
            del d["slimming"]
        if self.id2label is not None:  # as transformers writes it, so its pipelines map names both ways
            d["label2id"] = {name: index for index, name in self.id2label.items()}
        d["model_type"] = "bert"
        return d

    @classmethod
    def from_json_file(cls, path, **overrides) -> "BertConfig":
        """Read a config.json, `overrides` replacing its fields (e.g. num_labels); every error names the file."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object of config fields, got a {type(d).__name__}")
        try:
            return cls.from_dict({**d, **overrides})
        except ValueError as e:
            source = f"{path} with overrides {overrides}" if overrides else str(path)
            raise ValueError(f"{source}: {e}") from e

    def to_json_file(self, path, architectures=None):
        d = self.to_dict()
        if architectures:
            d["architectures"] = list(architectures)
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
