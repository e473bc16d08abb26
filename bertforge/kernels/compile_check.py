"""Compile every shipped kernel variant offline for real GPUs and check its resources.

    python -m bertforge.kernels.compile_check [--arch 80,90] [--json] [--kernels attention,layer_norm,gelu] [--jobs N]

Each kernel module exposes `compile_specs() -> list[CompileSpec]` (every autotune config and dtype). Each spec is
compiled with Triton's own compiler for each arch (no GPU or driver needed); the resource usage of the cubin is
read with the `cuobjdump` shipped in the triton wheel. A spec fails if it spills registers (STACK > 0), needs
more shared memory per block than the device allows, or does not compile. Exit status 1 on any failure.
"""

import argparse
import concurrent.futures
import contextlib
import functools
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = ("attention", "layer_norm", "gelu")

# Largest shared memory one block may use (static + dynamic, after opt-in), bytes. CUDA programming guide,
# "Technical Specifications per Compute Capability": A100 163 KB, H100 227 KB; the sm_86/89 consumer parts 99 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_USAGE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


class CompileCheckError(RuntimeError):
    """The check itself cannot run as asked (a module without compile_specs, an interpreter-built kernel, ...)."""


def module_path(name: str) -> str:
    """A shipped kernel name (attention, layer_norm, gelu) -> its module; anything else is taken as a module path."""
    return f"bertforge.kernels.{name}" if name in KERNELS else name


# --- worker side: runs in spawned processes whose environment has no TRITON_INTERPRET --------------------------

@functools.cache
def _specs(module_name: str) -> list:
    return importlib.import_module(module_name).compile_specs()


def _spec_count(module_name: str):
    """How many specs a module ships; None when it has no compile_specs()."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CompileCheckError(f"cannot import kernel module {module_name}: {e}") from None
    if not hasattr(module, "compile_specs"):
        return None
    return len(_specs(module_name))


def _jit_function(spec):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise CompileCheckError("TRITON_INTERPRET=1 in a compile worker: kernels would be interpreter objects")
    if not isinstance(spec.fn, triton.runtime.JITFunction):
        hint = ("the module was imported with TRITON_INTERPRET=1" if type(spec.fn).__name__ == "InterpretedFunction"
                else "pass the raw @triton.jit function (an autotuner's .fn)")
        raise CompileCheckError(f"{spec.kernel_name}: spec.fn is a {type(spec.fn).__name__}, not a JITFunction; {hint}")
    return spec.fn


def check_spec(spec):
    """Raise ValueError unless the spec's signature names exactly the kernel's arguments, its constexprs exactly
    the constexpr ones, and divisible_args only runtime arguments."""
    args = list(spec.fn.arg_names)
    if set(spec.signature) != set(args):
        raise ValueError(f"signature keys {sorted(spec.signature)} != kernel arguments {sorted(args)}")
    constexpr_args = {name for name, ty in spec.signature.items() if ty == "constexpr"}
    if set(spec.constexprs) != constexpr_args:
        raise ValueError(f"constexprs {sorted(spec.constexprs)} != constexpr arguments {sorted(constexpr_args)}")
    not_runtime = set(spec.divisible_args) - (set(args) - constexpr_args)
    if not_runtime:
        raise ValueError(f"divisible_args {sorted(not_runtime)} are not runtime kernel arguments")


def _source(spec):
    """The ASTSource of a spec, after `check_spec`."""
    fn = _jit_function(spec)
    check_spec(spec)
    args = list(fn.arg_names)
    # The attributes the JIT attaches to 16-aligned pointers and sizes: without them loads are not vectorised.
    attrs = {(args.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_args}
    return ASTSource(fn=fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)


def resource_usage(cubin: bytes) -> dict:
    """Per-function {"REG", "STACK", "SHARED", "LOCAL"} of a cubin, from `cuobjdump --dump-resource-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    usage = {m[0]: dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m[1:]))) for m in _USAGE.findall(out)}
    if not usage:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return usage


def _check_spec(module_name: str, index: int, arch: int) -> dict:
    """Compile spec `index` of a module for sm_<arch>; one result row (see `check`)."""
    spec = _specs(module_name)[index]
    row = {"module": module_name.removeprefix("bertforge.kernels."), "kernel": spec.kernel_name,
           "config": spec.config, "dtype": spec.dtype, "arch": arch, "num_warps": spec.num_warps,
           "num_stages": spec.num_stages, "registers": None, "spill_bytes": None, "shared_static_bytes": None,
           "shared_dynamic_bytes": None, "shared_bytes": None, "shared_limit_bytes": SHARED_LIMIT[arch],
           "problems": []}
    try:
        compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        usage = resource_usage(compiled.asm["cubin"])
    except CompileCheckError:
        raise
    except Exception as e:  # a compiler rejection is a finding about this spec, not a crash of the check
        row["problems"].append(f"does not compile: {type(e).__name__}: {str(e).strip()}")
        return row
    entry = usage[compiled.metadata.name]
    # metadata.shared is the dynamic shared memory Triton requests at launch; the cubin's SHARED is static.
    # The driver needs static + dynamic <= the opt-in limit. A noinline callee's stack is this launch's too.
    row.update(registers=entry["REG"], spill_bytes=sum(u["STACK"] for u in usage.values()),
               shared_static_bytes=entry["SHARED"], shared_dynamic_bytes=compiled.metadata.shared,
               shared_bytes=entry["SHARED"] + compiled.metadata.shared)
    if row["spill_bytes"]:
        row["problems"].append(f"spills: {row['spill_bytes']} bytes of stack")
    if row["shared_bytes"] > SHARED_LIMIT[arch]:
        row["problems"].append(f"shared memory {row['shared_bytes'] / 1024:.1f} KB > {SHARED_LIMIT[arch] // 1024} KB")
    return row


# --- parent side -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _compiler_environment():
    """Spawned workers inherit os.environ: hide TRITON_INTERPRET (with it, @triton.jit builds interpreter objects
    that cannot be compiled) and pin FP fusion (its default flips in Triton 3.10), only while workers start."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DEFAULT_FP_FUSION"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check(kernels=None, archs=(80, 90), jobs=None) -> list[dict]:
    """Compile every spec of the given kernel modules for each arch in a process pool; one dict per (spec, arch).

    Row keys: module, kernel, config, dtype, arch, num_warps, num_stages, registers, spill_bytes,
    shared_static_bytes, shared_dynamic_bytes, shared_bytes (= static + dynamic), shared_limit_bytes,
    problems (list of str, empty when the variant is fine). Raises CompileCheckError if a module has no specs.
    """
    modules = [module_path(k) for k in (kernels or KERNELS)]
    unknown = [a for a in archs if a not in SHARED_LIMIT]
    if unknown:
        raise CompileCheckError(f"no shared memory limit known for sm_{unknown[0]}; known: {sorted(SHARED_LIMIT)}")
    # spawn, not fork: a fresh interpreter imports the kernel modules again, under the cleaned environment.
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs or os.cpu_count(),
                                                  mp_context=multiprocessing.get_context("spawn"))
    with _compiler_environment(), pool:
        try:
            counts = dict(zip(modules, pool.map(_spec_count, modules)))
            unchecked = [m for m, n in counts.items() if not n]
            if unchecked:
                raise CompileCheckError(f"no compile_specs() (or an empty list) in {', '.join(unchecked)}: "
                                        "their kernels would go unchecked")
            futures = [pool.submit(_check_spec, module, index, arch)
                       for module, count in counts.items() for index in range(count) for arch in archs]
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # do not wait for the queued compiles of a failed check
            raise


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table; shared memory is static + dynamic, in KB."""
    header = ("kernel", "config", "dtype", "arch", "regs", "spill B", "smem KB", "limit KB", "status")
    lines = [header]
    for r in rows:
        compiled = r["registers"] is not None
        status = "ok" if not r["problems"] else ("ERROR" if not compiled else "FAIL")
        lines.append((f"{r['module']}.{r['kernel']}", r["config"], r["dtype"], f"sm_{r['arch']}",
                      str(r["registers"]) if compiled else "-", str(r["spill_bytes"]) if compiled else "-",
                      f"{r['shared_bytes'] / 1024:.1f}" if compiled else "-", str(r["shared_limit_bytes"] // 1024),
                      status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def summary(rows: list[dict]) -> str:
    """One line when every variant passes, else one line per failing variant with its problems."""
    failed = [r for r in rows if r["problems"]]
    if not failed:
        return f"OK: {len(rows)} kernel variants compiled, none spills, all within shared memory limits"
    lines = [f"FAILED: {len(failed)} of {len(rows)} kernel variants"]
    for r in failed:
        problems = "; ".join(p if len(p) < 600 else p[:600] + " ..." for p in r["problems"])
        lines.append(f"  {r['module']}.{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']}: {problems}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertforge.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help="comma-separated kernel modules: attention, layer_norm, gelu or a module path")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (summary goes to stderr)")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        parser.error(f"--arch takes comma-separated integers such as 80,90, got {args.arch!r}")

    start = time.perf_counter()
    try:
        rows = check([k.strip() for k in args.kernels.split(",") if k.strip()], archs, args.jobs)
    except CompileCheckError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
    print(summary(rows), f"({time.perf_counter() - start:.0f} s)", file=sys.stderr if args.json else sys.stdout)
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
