"""Fused, differentiable Triton ops with plain-PyTorch references (`bertforge.kernels.reference`), and a
dropout whose mask is cheap to draw on the CPU (`bertforge.kernels.dropout`), and a linear layer fused with
cross-entropy that never keeps the logits (`bertforge.kernels.cross_entropy`).

Imports nothing else of bertforge. See `_dispatch` for how a call picks Triton or the reference.
"""

from .attention import attention, attention_qkvpacked
from .cross_entropy import linear_cross_entropy
from .dropout import Dropout, dropout
from .gelu import bias_gelu
from ._validate import checks_values
from .layer_norm import layer_norm

__all__ = ["attention", "attention_qkvpacked", "layer_norm", "bias_gelu", "dropout", "Dropout", "checks_values",
           "linear_cross_entropy"]
