"""Compile every shipped kernel variant offline for real GPUs, check its resources and read its machine code.

    python -m bertforge.kernels.compile_check [--arch 80,90] [--kernels attention,layer_norm,gelu] [--only REGEX]
        [--jobs N] [--json | --markdown] [--report PATH]

Each kernel module exposes `compile_specs() -> list[CompileSpec]` (every variant a call can launch: autotune
config, dtype, flags). Each spec is compiled with Triton's own compiler for each arch (no GPU or driver needed);
the resource usage of the cubin is read with the `cuobjdump` shipped in the triton wheel. A spec fails if it
spills registers (STACK > 0), needs more shared memory per block than the device allows, or does not compile.
Exit status 1 on any failure.

The static performance report comes from the same cubin's SASS (`cuobjdump -sass`): the main loop is the largest
body between a backward branch and its target; in it are counted every instruction, the tensor-core ones (HMMA,
mma.sync; HGMMA, wgmma on sm_90), MUFU (exp2, rcp, ...) and local-memory loads/stores (spill traffic). Loop
instructions per element = loop instructions per warp x 32 lanes x warps / elements per iteration, i.e. what
one thread issues per element it owns (per score element, for attention). Counts are static: no GPU time.
"""

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import Autotuner

KERNELS = ("attention", "layer_norm", "gelu")

# Largest shared memory one block may use (static + dynamic, after opt-in), bytes. CUDA programming guide,
# "Technical Specifications per Compute Capability": A100 163 KB, H100 227 KB; the sm_86/89 consumer parts 99 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_USAGE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# One SASS instruction line: /*0230*/  @!P0 BRA 0x32c0 ;   -> address, opcode (with modifiers), operands.
_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


class CompileCheckError(RuntimeError):
    """The check itself cannot run as asked (a module without compile_specs, an interpreter-built kernel, ...)."""


def module_path(name: str) -> str:
    """A shipped kernel name (attention, layer_norm, gelu) -> its module; anything else is taken as a module path."""
    return f"bertforge.kernels.{name}" if name in KERNELS else name


# --- worker side: runs in spawned processes whose environment has no TRITON_INTERPRET --------------------------

@functools.cache
def _specs(module_name: str) -> list:
    return importlib.import_module(module_name).compile_specs()


def variant_name(module_name: str, spec) -> str:
    """How a variant is named in summaries and matched by `--only`: module.kernel [config] dtype."""
    return f"{module_name.removeprefix('bertforge.kernels.')}.{spec.kernel_name} [{spec.config}] {spec.dtype}"


def row_name(row: dict) -> str:
    """The `variant_name` of a result row."""
    return f"{row['module']}.{row['kernel']} [{row['config']}] {row['dtype']}"


def _spec_indices(module_name: str, only: str | None):
    """(how many specs the module ships, (index, archs) of those whose variant name matches the regex `only`, all
    when None); None when the module has no compile_specs()."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CompileCheckError(f"cannot import kernel module {module_name}: {e}") from None
    if not hasattr(module, "compile_specs"):
        return None
    specs = _specs(module_name)
    matching = [(i, spec.archs) for i, spec in enumerate(specs)
                if only is None or re.search(only, variant_name(module_name, spec))]
    return len(specs), matching


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
    out = _cuobjdump(cubin, "--dump-resource-usage")
    usage = {m[0]: dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m[1:]))) for m in _USAGE.findall(out)}
    if not usage:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return usage


def _cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, *flags, path],
                              capture_output=True, text=True, check=True).stdout


def sass_instructions(sass: str, function: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction of `function` in a `cuobjdump -sass` listing, NOPs left out."""
    sections = re.split(r"\n\s*Function : (\S+)\n", sass)
    bodies = dict(zip(sections[1::2], sections[2::2]))
    if function not in bodies:
        raise RuntimeError(f"no function {function} in the SASS listing (found {sorted(bodies)})")
    return [(int(address, 16), opcode, operands.strip()) for address, opcode, operands in _SASS_LINE.findall(
        bodies[function]) if opcode != "NOP"]


def main_loop(instructions: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the largest loop (from a backward branch's target to the branch), [] when none."""
    best = []
    for address, opcode, operands in instructions:
        if opcode.split(".")[0] != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        # A branch to itself ends the kernel (the trap after EXIT), one to a register has no static target: no loop.
        if target and int(target[1], 16) < address:
            target = int(target[1], 16)
            body = [i for i in instructions if target <= i[0] <= address]
            best = max(best, body, key=len)
    return best


def sass_stats(instructions: list[tuple[int, str, str]]) -> dict:
    """Counts the static report shows for a function, and for its main loop (None when it has no loop)."""
    def count(body, *prefixes):
        return sum(opcode.split(".")[0] in prefixes for _, opcode, _ in body)

    loop = main_loop(instructions)
    stats = {"instructions": len(instructions), "local_memory_ops": count(instructions, "LDL", "STL"),
             "hmma_ops": count(instructions, "HMMA"), "hgmma_ops": count(instructions, "HGMMA")}
    keys = ("loop_instructions", "loop_hmma", "loop_hgmma", "loop_mufu", "loop_local_memory_ops")
    values = (len(loop), count(loop, "HMMA"), count(loop, "HGMMA"), count(loop, "MUFU"), count(loop, "LDL", "STL"))
    stats.update(dict(zip(keys, values)) if loop else dict.fromkeys(keys))
    return stats


def instructions_per_element(row: dict, elements_per_iteration: int):
    """Per-thread instructions per element: the main loop's (or, loop-free, the kernel's) instructions per warp
    x 32 lanes x warps / the elements one iteration (or program) covers; None when the spec states no count."""
    if not elements_per_iteration or row["instructions"] is None:
        return None
    per_warp = row["loop_instructions"] if row["loop_instructions"] is not None else row["instructions"]
    return round(per_warp * 32 * row["num_warps"] / elements_per_iteration, 2)


def _check_spec(module_name: str, index: int, arch: int) -> dict:
    """Compile spec `index` of a module for sm_<arch>; one result row (see `check`)."""
    spec = _specs(module_name)[index]
    row = {"module": module_name.removeprefix("bertforge.kernels."), "kernel": spec.kernel_name,
           "config": spec.config, "dtype": spec.dtype, "arch": arch, "num_warps": spec.num_warps,
           "num_stages": spec.num_stages, "registers": None, "spill_bytes": None, "shared_static_bytes": None,
           "shared_dynamic_bytes": None, "shared_bytes": None, "shared_limit_bytes": SHARED_LIMIT[arch],
           "elements_per_iteration": spec.elements_per_iteration, "instructions": None, "local_memory_ops": None,
           "hmma_ops": None, "hgmma_ops": None, "loop_instructions": None, "loop_hmma": None, "loop_hgmma": None,
           "loop_mufu": None, "loop_local_memory_ops": None, "loop_instructions_per_element": None,
           "problems": []}
    try:
        compiled = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        usage = resource_usage(compiled.asm["cubin"])
        sass = sass_instructions(_cuobjdump(compiled.asm["cubin"], "-sass"), compiled.metadata.name)
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
    row.update(sass_stats(sass))
    row["loop_instructions_per_element"] = instructions_per_element(row, spec.elements_per_iteration)
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


def check(kernels=None, archs=(80, 90), jobs=None, only=None) -> list[dict]:
    """Compile every spec of the given kernel modules for each arch it is for (`CompileSpec.archs`) in a process
    pool; one dict per (spec, arch).
    `only`: a regex; then only the variants whose `variant_name` it matches.

    Row keys: module, kernel, config, dtype, arch, num_warps, num_stages, registers, spill_bytes,
    shared_static_bytes, shared_dynamic_bytes, shared_bytes (= static + dynamic), shared_limit_bytes,
    problems (list of str, empty when the variant is fine); from the SASS (None when it did not compile):
    instructions, local_memory_ops, hmma_ops, hgmma_ops (whole function), loop_instructions, loop_hmma,
    loop_hgmma, loop_mufu, loop_local_memory_ops (the main loop, per warp and iteration; None without a loop),
    elements_per_iteration and loop_instructions_per_element (see `instructions_per_element`).
    Raises CompileCheckError if a module has no specs.
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
            found = dict(zip(modules, pool.map(_spec_indices, modules, [only] * len(modules))))
            unchecked = [m for m, result in found.items() if not result or not result[0]]
            if unchecked:
                raise CompileCheckError(f"no compile_specs() (or an empty list) in {', '.join(unchecked)}: "
                                        "their kernels would go unchecked")
            compiles = [(module, index, arch) for module, (_, matching) in found.items()
                        for index, spec_archs in matching for arch in archs if arch in spec_archs]
            if not compiles:
                raise CompileCheckError(f"no variant matches --only {only!r} on sm_{', sm_'.join(map(str, archs))}")
            futures = [pool.submit(_check_spec, *compile) for compile in compiles]
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # do not wait for the queued compiles of a failed check
            raise


def _cell(value):
    return "-" if value is None else str(value)


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table: resources (shared memory static + dynamic, KB), then the SASS counts of
    the main loop per warp and iteration (mma: HMMA on sm_80, HGMMA + any HMMA fallback on sm_90; local: spill
    loads/stores inside the loop) and its instructions per element."""
    header = ("kernel", "config", "dtype", "arch", "regs", "spill B", "smem KB", "limit KB", "loop instr", "mma",
              "mufu", "local", "instr/elem", "status")
    lines = [header]
    for r in rows:
        compiled = r["registers"] is not None
        status = "ok" if not r["problems"] else ("ERROR" if not compiled else "FAIL")
        mma = None
        if r["loop_instructions"] is not None:
            mma = str(r["loop_hmma"]) if r["arch"] < 90 else f"{r['loop_hgmma']}+{r['loop_hmma']}"
        lines.append((f"{r['module']}.{r['kernel']}", r["config"], r["dtype"], f"sm_{r['arch']}",
                      _cell(r["registers"]), _cell(r["spill_bytes"]),
                      f"{r['shared_bytes'] / 1024:.1f}" if compiled else "-", str(r["shared_limit_bytes"] // 1024),
                      _cell(r["loop_instructions"]), _cell(mma), _cell(r["loop_mufu"]),
                      _cell(r["loop_local_memory_ops"]), _cell(r["loop_instructions_per_element"]), status))
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
        lines.append(f"  {row_name(r)} sm_{r['arch']}: {problems}")
    return "\n".join(lines)


def source_fingerprint(kernels) -> dict:
    """Per kernel module, a sha256 of what its compiled code depends on: the source of every @triton.jit function
    in it (kernels and helpers) and its tl.constexpr globals. A report made from other sources is stale; a change
    to the Python launchers alone leaves it current."""
    fingerprint = {}
    for name in kernels:
        module = importlib.import_module(module_path(name))
        parts = []
        for attr, value in sorted(vars(module).items()):
            fn = value.fn if isinstance(value, Autotuner) else value
            if type(fn).__name__ in ("JITFunction", "InterpretedFunction"):
                source = inspect.getsource(fn.fn)  # from its def, as Triton hashes it: decorators set launch options
                parts.append(f"{attr}\n{source[re.search(r'^def ', source, re.MULTILINE).start():]}")
            elif isinstance(value, tl.constexpr):
                parts.append(f"{attr} = {value.value!r}")
        fingerprint[module_path(name)] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return fingerprint


def write_report(path: str, rows: list[dict], kernels, archs) -> None:
    """The rows with what they were made from (triton version, archs, source fingerprint), one row per line."""
    header = {"triton": triton.__version__, "archs": list(archs), "sources": source_fingerprint(kernels)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(header)[:-1] + ', "rows": [\n')
        f.write(",\n".join(json.dumps(row) for row in rows) + "\n]}\n")
    os.replace(path + ".tmp", path)


def _best_by_loop_cost(rows):
    costed = [r for r in rows if r["loop_instructions_per_element"] is not None and not r["problems"]]
    return min(costed, key=lambda r: r["loop_instructions_per_element"]) if costed else None


def markdown_summary(rows: list[dict], before: list[dict] | None = None) -> str:
    """The README's tables: resources per kernel over every variant, and how many sm_90 loops run a dot on
    mma.sync instead of wgmma; then, per attention kernel and arch, the training variant (packed, dropout, bf16)
    at head_dim 64 and 32: the passing config with the fewest loop instructions per score element, beside the
    same config without dropout, and (given `before`, the rows of an earlier report) the same variant there."""
    lines = ["| kernel | variants (sm_80 / sm_90) | max registers (sm_80 / sm_90) | max spill bytes | "
             "max shared memory KB (sm_80 / sm_90) | sm_90 variants with mma.sync in the loop |",
             "|---|---|---|---|---|---|"]
    kernels = list(dict.fromkeys(f"{r['module']}.{r['kernel']}" for r in rows))
    for kernel in kernels:
        per_arch = {a: [r for r in rows if f"{r['module']}.{r['kernel']}" == kernel and r["arch"] == a]
                    for a in (80, 90)}

        def both(fn):
            return " / ".join(str(fn(per_arch[a])) if per_arch[a] else "-" for a in (80, 90))

        spill = max((r["spill_bytes"] or 0) for a in (80, 90) for r in per_arch[a])
        mma_sync = sum(1 for r in per_arch[90] if r["loop_hmma"])  # wgmma needs 64-row dots; smaller fall back
        lines.append(f"| {kernel} | {both(len)} | {both(lambda rs: max(r['registers'] or 0 for r in rs))} | {spill} | "
                     f"{both(lambda rs: round(max(r['shared_bytes'] or 0 for r in rs) / 1024))} | {mma_sync} |")
    earlier = {(row_name(r), r["arch"]): r for r in before or []}
    lines += ["", "| attention kernel (bf16, packed) | head_dim | arch | config | registers | loop instr per warp | "
              "mma per iteration | MUFU per iteration | instr per score element | without dropout | ratio |"
              + (" before |" if before else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if before else "")]
    for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        for block_d in (64, 32):
            for arch in (80, 90):
                mine = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch and r["dtype"] == "bf16"]
                train = _best_by_loop_cost([r for r in mine if r["config"].startswith(f"D{block_d},varlen,dropout,")])
                if train is None:
                    continue
                tile = train["config"].removeprefix(f"D{block_d},varlen,dropout,")
                plain = next((r for r in mine if r["config"] == f"D{block_d},varlen,{tile}"), None)
                mma = (train["loop_hmma"] if arch < 90
                       else f"{train['loop_hgmma']} wgmma + {train['loop_hmma']} mma.sync")
                plain_cost = plain["loop_instructions_per_element"] if plain else None
                ratio = f"{train['loop_instructions_per_element'] / plain_cost:.1f}x" if plain_cost else "-"
                line = (f"| {kernel.removeprefix('attention_')} | {block_d} | sm_{arch} | {tile} | "
                        f"{train['registers']} | {train['loop_instructions']} | {mma} | {train['loop_mufu']} | "
                        f"{train['loop_instructions_per_element']} | {plain_cost} | {ratio} |")
                if before:
                    old = earlier.get((row_name(train), arch))
                    line += f" {old['loop_instructions_per_element'] if old else '-'} |"
                lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bertforge.kernels.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--kernels", default=",".join(KERNELS),
                        help="comma-separated kernel modules: attention, layer_norm, gelu or a module path")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    parser.add_argument("--only", default=None, help="a regex: only the variants whose 'module.kernel [config] "
                        "dtype' name matches it")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (summary goes to stderr)")
    parser.add_argument("--markdown", action="store_true", help="print the README's summary tables")
    parser.add_argument("--compare", default=None, metavar="PATH",
                        help="with --markdown: an earlier report (--report's JSON) to show each figure's before value")
    parser.add_argument("--report", default=None, metavar="PATH",
                        help="also write the rows, the triton version and the sources' fingerprint to PATH (JSON)")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        parser.error(f"--arch takes comma-separated integers such as 80,90, got {args.arch!r}")

    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as e:
            parser.error(f"--only {args.only!r} is not a regular expression: {e}")
    before = None
    if args.compare:
        try:
            with open(args.compare) as f:
                before = json.load(f)["rows"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--compare {args.compare}: not a report written by --report ({e})")
    start = time.perf_counter()
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    try:
        rows = check(kernels, archs, args.jobs, args.only)
        if args.report:
            write_report(args.report, rows, kernels, archs)
    except CompileCheckError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    quiet = args.json or args.markdown
    if args.json:
        print(json.dumps(rows, indent=1))
    elif args.markdown:
        print(markdown_summary(rows, before))
    else:
        print(format_table(rows))
    print(summary(rows), f"({time.perf_counter() - start:.0f} s)", file=sys.stderr if quiet else sys.stdout)
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
