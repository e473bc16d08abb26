"""Shared Triton plumbing: interpreter detection, autotune pruning, offline compile specs."""

import dataclasses
import os

import torch


def interpreting() -> bool:
    """True when Triton's CPU interpreter is active (it must be set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def prune_configs_for_host(configs, named_args, **kwargs):
    """Autotune prune hook: the interpreter cannot benchmark (no driver), so it runs the first config."""
    return configs[:1] if interpreting() else configs


TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass
class CompileSpec:
    """One kernel variant to compile offline: what `triton.compile(ASTSource(...))` needs, plus a label."""

    kernel_name: str
    fn: object  # the JITFunction (unwrapped from any autotuner)
    signature: dict  # argument name -> "*fp16" / "i32" / "fp32" / "constexpr"
    constexprs: dict  # constexpr name -> value (the config's block sizes included)
    num_warps: int
    num_stages: int
    config: str  # human label of the autotune config, e.g. "BLOCK_M=128,BLOCK_N=64,w4,s3"
    dtype: str  # "fp16" / "bf16" / "fp32"
    divisible_args: tuple = ()  # argument names the JIT would mark 16-divisible (aligned pointers, strides)


def config_label(config) -> str:
    """Readable name of a triton.Config: its block sizes, warps and stages."""
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks},w{config.num_warps},s{config.num_stages}"


_poison = False


class poison_outputs:
    """Context manager: kernel outputs are allocated NaN-filled, so an element a kernel fails to write shows up."""

    def __enter__(self):
        global _poison
        self._previous, _poison = _poison, True

    def __exit__(self, *exc):
        global _poison
        _poison = self._previous


def empty(shape, dtype, device):
    """Allocate a kernel output (uninitialised, or NaN inside `poison_outputs`)."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def kernel_signature(fn, types: dict, default: str = "i32") -> dict:
    """Compile signature of a JITFunction: constexpr params marked, others typed from `types` (else `default`)."""
    return {p.name: "constexpr" if p.is_constexpr else types.get(p.name, default) for p in fn.params}
