"""Shared Triton plumbing: interpreter detection, autotune pruning, grid sizing, offline compile specs."""

import dataclasses
import inspect
import os

import torch
import triton.language as tl
from triton.runtime import Autotuner


def interpreting() -> bool:
    """True when Triton's CPU interpreter is active (it must be set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def prune_configs_for_host(configs, named_args, **kwargs):
    """Autotune prune hook: the interpreter cannot benchmark (no driver), so it runs the first config."""
    return configs[:1] if interpreting() else configs


TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


ANY_ARCH = range(1000)  # compute capabilities (10 major + minor): a variant every GPU may launch


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
    # Elements one iteration of the kernel's main loop covers (score elements for attention), or one program when
    # it has no loop: the static report divides instruction counts by it. 0 = not stated.
    elements_per_iteration: int = 0
    archs: range = ANY_ARCH  # the compute capabilities that can launch it


def config_label(config) -> str:
    """Readable name of a triton.Config: its block sizes, warps and stages."""
    return ",".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


def compile_spec(kernel, config, dtype: str, types: dict, constexprs: dict, label: str = "",
                 divisible_scalars=(), elements_per_iteration=None, archs=ANY_ARCH) -> CompileSpec:
    """One kernel variant for the offline compile check, the same way for every op.

    kernel: a @triton.jit function or the autotuner around one; config: the triton.Config it runs with (its block
    sizes join `constexprs`); dtype: the op's dtype name; types: compile types of pointer and float arguments (the
    others are i32); label: what tells this variant apart besides the config (e.g. a head_dim class).
    Pointers are marked 16-divisible, as the JIT marks torch's aligned pointers, and so are `divisible_scalars`,
    the integer arguments real calls pass as multiples of 16: without that, loads are not vectorised.
    elements_per_iteration: a function of the constexprs (block sizes included) giving the elements one main-loop
    iteration (or one loop-free program) covers. archs: the compute capabilities whose autotuner lists hold the
    config (the compile check compiles it for those only).
    """
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = kernel_signature(fn, types)
    divisible = tuple(a for a, kind in signature.items() if kind.startswith("*") or a in divisible_scalars)
    constexprs = {**constexprs, **config.kwargs}
    return CompileSpec(kernel_name=fn.__name__.strip("_").removesuffix("_kernel"), fn=fn, signature=signature,
                       constexprs=constexprs, num_warps=config.num_warps,
                       num_stages=config.num_stages, config=",".join(filter(None, (label, config_label(config)))),
                       dtype=dtype, divisible_args=divisible,
                       elements_per_iteration=elements_per_iteration(constexprs) if elements_per_iteration else 0,
                       archs=archs)


PROGRAMS_PER_SM = 4  # enough resident programs per SM to hide memory latency in the backward reductions


def programs_to_fill(device) -> int:
    """Programs to split a backward reduction over: a few per SM on a GPU. Elsewhere (the interpreter, which runs
    programs one after another) the host counts as one SM: fewer, longer programs cost it nothing."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return PROGRAMS_PER_SM * sms


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
    """Compile signature of a @triton.jit function (a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1):
    constexpr params marked, others typed from `types` (else `default`)."""
    params = inspect.signature(fn.fn).parameters.values()  # fn.fn: the Python function in either wrapper
    return {p.name: "constexpr" if p.annotation is tl.constexpr else types.get(p.name, default) for p in params}
