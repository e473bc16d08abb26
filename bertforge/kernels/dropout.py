"""Dropout whose mask is cheap to draw on the CPU.

On a small model's CPU training step the random-number generator, not the arithmetic, is what dropout costs:
`torch.nn.functional.dropout` draws one number per element (`bernoulli_`), about 6 ns each on this class of
machine, which made dropout a fifth of bertforge's whole CPU step. Here each 64-bit draw gives four 16-bit
uniforms, and an element is kept when its uniform is at or above round(p * 2**16). So the drop probability
is that threshold over 2**16 (within 2**-17 of p, e.g. 0.1000061 for p = 0.1), and the kept elements are
scaled by exactly 1 / (1 - that probability), which keeps E[dropout(x)] = x exactly.

On CUDA tensors it is torch's own fused dropout. It draws from torch's global generator either way, so
`torch.manual_seed` and saved RNG states reproduce it.
"""

import math

import torch
import torch.nn.functional as F

_LEVELS = 1 << 16


def quantised_probability(p: float) -> tuple[int, float]:
    """(threshold, drop probability): a 16-bit uniform below round(p * 2**16) drops; the probability that gives.
    The attention kernels' dropout uses the same quantisation."""
    threshold = round(p * _LEVELS)
    return threshold, threshold / _LEVELS


def keep_mask(shape, p: float, device=None) -> tuple[torch.Tensor, float]:
    """(bool mask of `shape`, True = keep; the drop probability it was drawn with)."""
    threshold, p_eff = quantised_probability(p)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(torch.iinfo(torch.int64).min, None)  # all 64 bits uniform (from=min, to=None is the full range)
    # Reinterpret as unsigned 16-bit values in [0, 2**16): int16 view, shifted by 2**15.
    uniform16 = words.view(torch.int16)[:numel].view(shape)
    return uniform16 >= threshold - _LEVELS // 2, p_eff


def draw_dropout_seed() -> int:
    """A seed for a kernel's dropout RNG, drawn from torch's default CPU generator (so torch.manual_seed governs it)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability p (see the module docstring for the CPU's 2**-16 granularity)."""
    _check_probability(p)
    if not training or p == 0.0:
        return x
    if x.is_cuda:
        return F.dropout(x, p, training=True)
    keep, p_eff = keep_mask(x.shape, p, device=x.device)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p_eff))


class Dropout(torch.nn.Module):
    """nn.Dropout with the CPU-cheap mask of `dropout`."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        _check_probability(p)
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"
