"""Choose Triton or the plain-PyTorch reference for a call.

BERTFORGE_KERNELS=auto (default): Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1;
the reference otherwise. BERTFORGE_KERNELS=triton or =reference forces one.
"""

import os

import torch

from ._triton import interpreting

_CHOICES = ("auto", "triton", "reference")


def use_triton(x: torch.Tensor) -> bool:
    choice = os.environ.get("BERTFORGE_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"BERTFORGE_KERNELS must be one of {_CHOICES}, got {choice!r}")
    if choice == "reference":
        return False
    runnable = x.is_cuda or interpreting()
    if choice == "triton" and not runnable:
        raise RuntimeError(
            "BERTFORGE_KERNELS=triton but the tensor is on the CPU and TRITON_INTERPRET=1 is not set; "
            "Triton kernels need a CUDA tensor or the interpreter"
        )
    return runnable
