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
from .exits import EarlyExitOutput, MultiExitBert, MultiExitOutput, early_exit, pooled_early_exit
from .packing import IGNORE_INDEX, TokenPacking, mlm_label_positions

__all__ = [
    "IGNORE_INDEX",
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
    "EarlyExitOutput",
    "Layout",
    "MultiExitBert",
    "MultiExitOutput",
    "ResidualLayerNorm",
    "TokenPacking",
    "early_exit",
    "load_hf_state_dict",
    "mlm_label_positions",
    "pooled_early_exit",
    "save_pretrained",
]
