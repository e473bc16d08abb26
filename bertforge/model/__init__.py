"""The BERT encoder on bertforge's kernels, its task heads, and Hugging Face checkpoint conversion."""

from .bert import (
    BertEmbeddings,
    BertEncoder,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertLayer,
    BertModel,
    BertOutput,
    BertPooler,
    BertSelfAttention,
    Layout,
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
    "BertOutput",
    "BertPooler",
    "BertSelfAttention",
    "Layout",
    "load_hf_state_dict",
    "save_pretrained",
]
