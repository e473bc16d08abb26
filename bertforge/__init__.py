"""bertforge: fast BERT training on fused Triton kernels."""

__version__ = "0.1.0"
