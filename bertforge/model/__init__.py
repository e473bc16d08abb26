"""The BERT encoder on bertforge's kernels, its task heads, and Hugging Face checkpoint conversion."""

from .bert import (
    BertEmbeddings,
    BertEncoder,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertLayer,
    BertModel,
    BertModelOutput,
    BertPooler,
    BertSelfAttention,
    Layout,
    ResidualLayerNorm,
)
from .config import BertConfig
from .convert import load_hf_state_dict, save_pretrained

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertLayer",
    "BertModel",
    "BertModelOutput",
    "BertPooler",
    "BertSelfAttention",
    "Layout",
    "ResidualLayerNorm",
    "load_hf_state_dict",
    "save_pretrained",
]
