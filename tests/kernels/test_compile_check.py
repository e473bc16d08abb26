"""The offline compile check: every shipped kernel variant compiles for sm_80/sm_90 without spills, and the check
itself catches spills, oversized shared memory and compiler rejections (shown with toy kernels defined here).

check() compiles in spawned worker processes started without TRITON_INTERPRET, so it runs fine inside this
interpreter-mode test session; the workers import this module by name to get the toys' compile_specs().
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl
from triton.runtime import Autotuner

from bertforge.kernels._triton import TRITON_DTYPE, CompileSpec, config_label
from bertforge.kernels.compile_check import (
    KERNELS,
    CompileCheckError,
    check,
    check_spec,
    format_table,
    module_path,
    summary,
)

ARCHS = (80, 90)


def test_every_shipped_kernel_variant_compiles_without_spills_within_shared_memory():
    rows = check(KERNELS, ARCHS)
    assert {r["module"] for r in rows} == set(KERNELS)
    assert {r["arch"] for r in rows} == set(ARCHS)
    print(format_table(rows))
    failed = [r for r in rows if r["problems"]]
    assert not failed, summary(rows)


@pytest.mark.parametrize("name", KERNELS)
def test_specs_cover_every_kernel_config_and_dtype(name):
    """What the check compiles (built here, not compiled): every kernel of the module, in every dtype, with every
    config its autotuner may pick, each spec consistent with the kernel's arguments."""
    module = importlib.import_module(module_path(name))
    specs = module.compile_specs()
    for spec in specs:
        check_spec(spec)
    kernels = [obj for attr, obj in vars(module).items() if attr.endswith("_kernel")]  # not the device helpers
    assert kernels
    for kernel in kernels:
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        mine = [s for s in specs if s.fn is fn]
        assert {s.dtype for s in mine} == set(TRITON_DTYPE.values()), fn.__name__
        for config in kernel.configs if isinstance(kernel, Autotuner) else ():
            compiled = any(s.num_warps == config.num_warps and s.num_stages == config.num_stages
                           and config.kwargs.items() <= s.constexprs.items() for s in mine)
            assert compiled, f"{fn.__name__} [{config_label(config)}] is never compiled"


# --- toys that must pass or fail --------------------------------------------------------------------------------

@triton.jit
def _toy_scale(X, Y, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offsets, mask=offsets < n)
    tl.store(Y + offsets, x * 2, mask=offsets < n)


@triton.jit
def _toy_register_hog(X, Y, BLOCK: tl.constexpr):
    # A whole BLOCK x BLOCK fp32 tile, two reductions live at once: 128 x 128 / 32 threads cannot fit registers.
    rows = tl.arange(0, BLOCK)
    tile = tl.load(X + rows[:, None] * BLOCK + rows[None, :])
    y = tl.exp(tile) * tl.sum(tile, axis=0)[None, :]
    tl.store(Y + rows[:, None] * BLOCK + rows[None, :], y + tl.sum(y, axis=1)[:, None])


@triton.jit
def _toy_matmul(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Software pipelining keeps num_stages copies of the A and B tiles in shared memory.
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc.to(C.dtype.element_ty))


def compile_specs():
    """The toys' variants; the compile workers call this (module found by name)."""
    matmul_signature = {"A": "*fp16", "B": "*fp16", "C": "*fp16", "K": "i32",
                        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    return [
        CompileSpec("scale", _toy_scale, {"X": "*fp16", "Y": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": 1024}, 4, 1, "BLOCK=1024,w4,s1", "fp16", ("X", "Y")),
        CompileSpec("register_hog", _toy_register_hog, {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"},
                    {"BLOCK": 128}, 1, 1, "BLOCK=128,w1,s1", "fp32", ("X", "Y")),
        # 4 stages of (64x256 + 256x64) fp16 tiles: 192 KB on sm_80, 257 KB on sm_90.
        CompileSpec("shared_hog", _toy_matmul, matmul_signature, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 256},
                    4, 4, "BLOCK_K=256,w4,s4", "fp16", ("A", "B", "C", "K")),
        # tl.dot needs an inner dimension of at least 16 on a GPU (the interpreter would accept 8).
        CompileSpec("thin_dot", _toy_matmul, matmul_signature, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 8},
                    4, 1, "BLOCK_K=8,w4,s1", "fp16", ("A", "B", "C", "K")),
    ]


@pytest.fixture(scope="module")
def toy_rows():
    return {(r["kernel"], r["arch"]): r for r in check([__name__], ARCHS)}


@pytest.mark.parametrize("arch", ARCHS)
def test_fitting_kernel_passes(toy_rows, arch):
    row = toy_rows["scale", arch]
    assert row["problems"] == [] and row["spill_bytes"] == 0 and row["registers"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_register_hungry_kernel_is_flagged_as_spilling(toy_rows, arch):
    row = toy_rows["register_hog", arch]
    assert row["spill_bytes"] > 0
    assert any("spills" in p for p in row["problems"])


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_over_the_shared_memory_limit_is_flagged(toy_rows, arch):
    row = toy_rows["shared_hog", arch]
    assert row["shared_bytes"] == row["shared_static_bytes"] + row["shared_dynamic_bytes"] > row["shared_limit_bytes"]
    assert any("shared memory" in p for p in row["problems"])


def test_compiler_rejection_is_reported_not_raised(toy_rows):
    problems = toy_rows["thin_dot", 80]["problems"]
    assert len(problems) == 1 and problems[0].startswith("does not compile: CompilationError")


def test_module_without_compile_specs_is_an_error():
    with pytest.raises(CompileCheckError, match="no compile_specs"):
        check(["json"], (80,), jobs=1)


def test_table_has_a_line_per_variant_and_a_status(toy_rows):
    rows = list(toy_rows.values())
    lines = format_table(rows).splitlines()
    assert lines[0].split() == "kernel config dtype arch regs spill B smem KB limit KB status".split()
    assert len(lines) == 2 + len(rows)
    statuses = {line.split()[0] + " " + line.split()[3]: line.split()[-1] for line in lines[2:]}
    assert statuses[f"{__name__}.scale sm_80"] == "ok"
    assert statuses[f"{__name__}.register_hog sm_90"] == "FAIL"
    assert statuses[f"{__name__}.thin_dot sm_80"] == "ERROR"
    assert summary(rows).startswith(f"FAILED: 6 of {len(rows)}")  # three failing toys, two archs each


def test_command_line_prints_json_rows_and_exits_nonzero_on_a_failure():
    # TRITON_INTERPRET=1 stays in the environment, as in this session: the command must cope with it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "bertforge.kernels.compile_check", "--kernels", __name__,
                             "--arch", "80", "--json", "--jobs", "1"], capture_output=True, text=True, env=env)
    assert result.returncode == 1, result.stderr
    rows = json.loads(result.stdout)
    assert [r["kernel"] for r in rows] == ["scale", "register_hog", "shared_hog", "thin_dot"]
    assert all(r["arch"] == 80 for r in rows)
    assert "FAILED: 3 of 4" in result.stderr
