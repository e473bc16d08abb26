"""The dropout random numbers every kernel shares: eight 16-bit uniforms from one 7-round Philox call.

An element is dropped when its uniform is below `dropout.quantised_probability(p)[0]`, the same 2^-16 grid as the
CPU dropout. 7 rounds, as FlashAttention-2's Triton LayerNorm uses (Triton's default is 10).
"""

import triton
import triton.language as tl

from .dropout import quantised_probability

# Kernel arguments that change from call to call: the JIT must not specialise on their values (it would make a 1 a
# compile-time constant and compile again for multiples of 16).
DRAWN_PER_CALL = ["seed", "dropout_threshold"]


class KernelDropout:
    """One kernel call's dropout arguments: its seed, the 16-bit threshold, and the exact inverse keep rate."""

    def __init__(self, p: float, seed: int):
        self.seed, (self.threshold, p_eff) = seed, quantised_probability(p)
        self.scale = 1.0 / (1.0 - p_eff)

    def kernel_args(self) -> dict:
        return dict(seed=self.seed, dropout_threshold=self.threshold, dropout_scale=self.scale)


@triton.jit
def eight_uniforms(seed, counters):
    """(*counters.shape, 2, 2, 2) uniforms in [0, 2^16), indexed [word // 2, word % 2, half]: the four 32-bit
    words of the Philox call at each counter, each split into its low and high 16 bits."""
    r0, r1, r2, r3 = tl.randint4x(seed, counters, n_rounds=7)
    low = tl.join(tl.join(r0 & 0xFFFF, r1 & 0xFFFF), tl.join(r2 & 0xFFFF, r3 & 0xFFFF))
    high = tl.join(tl.join(r0 >> 16, r1 >> 16), tl.join(r2 >> 16, r3 >> 16))
    return tl.join(low, high)
