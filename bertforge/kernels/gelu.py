"""PLACEHOLDER until the Triton kernel lands: validates, then runs the reference."""

from . import reference
from ._validate import check_bias_gelu_inputs


def bias_gelu(x, bias, approximate="none"):
    """y = GELU(x + bias); x (..., N), bias (N,). approximate: "none" (erf, BERT's) or "tanh"."""
    check_bias_gelu_inputs(x, bias, approximate)
    return reference.bias_gelu(x, bias, approximate)
