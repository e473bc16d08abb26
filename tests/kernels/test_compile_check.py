"""The offline compile check: every shipped kernel variant compiles for sm_80/sm_90 without spills, and the check
itself catches spills, oversized shared memory and compiler rejections (shown with toy kernels defined here).

check() compiles in spawned worker processes started without TRITON_INTERPRET, so it runs fine inside this
interpreter-mode test session; the workers import this module by name to get the toys' compile_specs().
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
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
    main_loop,
    markdown_summary,
    module_path,
    row_name,
    sass_instructions,
    sass_stats,
    source_fingerprint,
    summary,
    variant_name,
)
from bertforge.kernels.compile_check import main as compile_check_main

ARCHS = (80, 90)


REPORT = pathlib.Path(__file__).resolve().parents[2] / "report" / "kernels" / "compile_check.json"
REGENERATE = ("regenerate it: python -m bertforge.kernels.compile_check --markdown --compare "
              "report/kernels/compile_check_before.json --report report/kernels/compile_check.json")
# What BertModel launches for the shipped checkpoints (MiniLM head_dim 32, BERT-base 64) in bf16 training and
# evaluation: compiled afresh by the test below, with the memory-bound kernels whole.
COMPILED_HERE = r"^(layer_norm|gelu)\.|^attention\.\S+ \[D(32|64),varlen,(dropout,)?.*\] bf16$"


@pytest.fixture(scope="module")
def committed_report():
    return json.loads(REPORT.read_text())


def test_the_committed_report_is_current_and_every_variant_in_it_passes(committed_report):
    """The full check (every variant a call can launch: thousands of compiles, about 10 minutes on 2 cores) is
    committed: it must come from today's kernel sources, list exactly today's variants, and have no failure."""
    assert committed_report["sources"] == source_fingerprint(KERNELS), f"the kernels changed; {REGENERATE}"
    expected = {(variant_name(module_path(name), spec), arch) for name in KERNELS
                for spec in importlib.import_module(module_path(name)).compile_specs()
                for arch in ARCHS if arch in spec.archs}
    rows = committed_report["rows"]
    assert len(rows) == len(expected) and {(row_name(r), r["arch"]) for r in rows} == expected, REGENERATE
    assert not [r for r in rows if r["problems"]], summary(rows)
    before = json.loads((REPORT.parent / "compile_check_before.json").read_text())["rows"]
    readme = (REPORT.parents[2] / "README.md").read_text()
    assert markdown_summary(rows, before) in readme, "the README's tables are not the report's: paste --markdown's"


def test_a_fresh_compile_agrees_with_the_committed_report(committed_report):
    rows = check(KERNELS, ARCHS, only=COMPILED_HERE)
    assert {r["module"] for r in rows} == set(KERNELS) and {r["arch"] for r in rows} == set(ARCHS)
    print(format_table(rows))
    assert not [r for r in rows if r["problems"]], summary(rows)
    if committed_report["triton"] != triton.__version__:
        pytest.skip(f"the report was compiled by triton {committed_report['triton']}, this is {triton.__version__}")
    reported = {(row_name(r), r["arch"]): r for r in committed_report["rows"]}
    for row in rows:
        assert row == reported[row_name(row), row["arch"]], f"{row_name(row)} sm_{row['arch']}: {REGENERATE}"


def test_every_sm90_attention_loop_runs_its_dots_on_wgmma(committed_report):
    """Except dK/dV at head_dim 128 and in fp32, whose 64-row tiles spill (attention.py): those keep mma.sync."""
    loops = [r for r in committed_report["rows"] if r["module"] == "attention" and r["arch"] == 90
             and r["loop_instructions"] is not None and r["kernel"] != "attention_bwd_delta"]
    excepted = [r for r in loops if r["kernel"] == "attention_bwd_dkdv"
                and (r["dtype"] == "fp32" or r["config"].startswith("D128,"))]
    on_mma_sync = [f"{row_name(r)}: {r['loop_hmma']}" for r in loops if r["loop_hmma"] and r not in excepted]
    assert not on_mma_sync, on_mma_sync
    assert loops and all(r["loop_hgmma"] > 0 for r in loops if r not in excepted)


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


def test_attention_specs_cover_every_flag_combination_a_call_launches():
    """The launcher's own kernel arguments, for every layout, dropout setting and head_dim the API accepts, each
    appear in the compiled specs of every attention kernel."""
    attention = importlib.import_module("bertforge.kernels.attention")
    launched = set()
    for head_dim in range(16, 129, 16):
        for dropout_p in (0.0, 0.1):
            q = torch.zeros(2, 3, 5, head_dim)
            padded = dict(cu_seqlens=None, is_varlen=False, batch=2, heads=3, max_seqlen=5)
            layouts = [dict(padded, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
                       dict(padded, key_padding_mask=None),
                       dict(key_padding_mask=None, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32),
                            is_varlen=True, batch=2, heads=3, max_seqlen=3)]
            for layout in layouts:
                problem = attention.AttentionProblem(q, head_dim=head_dim, dropout_p=dropout_p, softmax_scale=None,
                                                     seed=0, **layout)
                args = problem.kernel_args()
                launched.add(tuple(args[k] for k in ("IS_VARLEN", "HAS_MASK", "HAS_DROPOUT", "BLOCK_D")))
    assert len(launched) == 3 * 2 * 4
    specs = attention.compile_specs()
    for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        compiled = {tuple(s.constexprs[k] for k in ("IS_VARLEN", "HAS_MASK", "HAS_DROPOUT", "BLOCK_D"))
                    for s in specs if s.kernel_name == kernel}
        assert launched <= compiled, f"{kernel}: never compiled: {sorted(launched - compiled)}"
        assert all(not s.constexprs["DOT_IN_FP32"] for s in specs if s.kernel_name == kernel)  # interpreter only


@pytest.mark.parametrize("name", ["attention", "layer_norm"])
def test_per_call_random_arguments_are_not_specialised(name):
    """On a GPU the JIT would turn a seed or threshold of 1 into a compile-time constant (whose `.to` fails) and build
    again for multiples of 16; the interpreter does not specialise, so the kernels' declarations are checked."""
    module = importlib.import_module(module_path(name))
    kernels = [obj.fn if isinstance(obj, Autotuner) else obj for attr, obj in vars(module).items()
               if attr.endswith("_kernel")]
    with_seed = [k for k in kernels if "seed" in k.arg_names]
    assert with_seed
    for kernel in with_seed:
        declared = (kernel.kwargs.get("do_not_specialize") if hasattr(kernel, "kwargs")
                    else [kernel.arg_names[i] for i in kernel.do_not_specialize])
        assert {"seed", "dropout_threshold"} <= set(declared or ()), kernel.fn.__name__


def test_a_bad_only_pattern_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        compile_check_main(["--only", "(["])
    assert exit_info.value.code == 2
    assert "is not a regular expression" in capsys.readouterr().err


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


@triton.jit
def _toy_exp_matmul(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A loop whose iteration takes exp of every element of a BLOCK_M x BLOCK_N product tile.
    rm, rn, rk = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.exp2(tl.dot(a, b))
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
        CompileSpec("exp_matmul", _toy_exp_matmul, matmul_signature, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                    4, 2, "BLOCK=64,w4,s2", "fp16", ("A", "B", "C", "K"), elements_per_iteration=64 * 64),
        CompileSpec("hopper_scale", _toy_scale, {"X": "*fp16", "Y": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": 1024}, 4, 1, "BLOCK=1024,w4,s1", "fp16", ("X", "Y"), archs=range(90, 100)),
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


def test_a_variant_is_compiled_only_for_the_archs_whose_lists_hold_it(toy_rows):
    assert ("hopper_scale", 90) in toy_rows and ("hopper_scale", 80) not in toy_rows
    with pytest.raises(CompileCheckError, match="no variant matches"):
        check([__name__], (80,), jobs=1, only=r"\.hopper_scale ")


def test_module_without_compile_specs_is_an_error():
    with pytest.raises(CompileCheckError, match="no compile_specs"):
        check(["json"], (80,), jobs=1)


def test_table_has_a_line_per_variant_and_a_status(toy_rows):
    rows = list(toy_rows.values())
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ("kernel config dtype arch regs spill B smem KB limit KB loop instr mma mufu local "
                                "instr/elem status").split()
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
    assert [r["kernel"] for r in rows] == ["scale", "register_hog", "shared_hog", "thin_dot", "exp_matmul"]
    assert all(r["arch"] == 80 for r in rows)
    assert "FAILED: 3 of 5" in result.stderr


def test_compare_refuses_a_file_that_is_not_a_report(tmp_path, capsys):
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        compile_check_main(["--markdown", "--compare", str(tmp_path / "rows.json")])
    assert exit_info.value.code == 2
    assert "not a report written by --report" in capsys.readouterr().err


def test_only_compiles_the_variants_its_regex_names():
    rows = check([__name__], (80,), jobs=1, only=r"\.(scale|exp_matmul) ")
    assert [r["kernel"] for r in rows] == ["scale", "exp_matmul"]
    with pytest.raises(CompileCheckError, match="no variant matches"):
        check([__name__], (80,), jobs=1, only="no such kernel")


# --- the static report: counts read from the SASS ------------------------------------------------------------

LISTING = """
\tcode for sm_80
\t\tFunction : flat
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   EXIT ;
        /*0020*/                   BRA 0x20;
\t\tFunction : other
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BRA 0x0 ;
\t\tFunction : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   MUFU.EX2 R2, R3 ;
        /*0030*/                   LDL R5, [R1] ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   NOP ;
        /*0060*/                   MUFU.EX2 R2, R3 ;
        /*0070*/              @!P1 BRA 0x60 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x90;
"""


def test_the_main_loop_is_the_largest_backward_branch_body():
    instructions = sass_instructions(LISTING, "kernel")
    assert [opcode for _, opcode, _ in instructions] == [
        "MOV", "HMMA.16816.F32", "MUFU.EX2", "LDL", "BRA", "MUFU.EX2", "BRA", "EXIT", "BRA"]  # NOP left out
    assert [address for address, _, _ in main_loop(instructions)] == [0x10, 0x20, 0x30, 0x40]
    stats = sass_stats(instructions)
    assert (stats["loop_instructions"], stats["loop_hmma"], stats["loop_mufu"], stats["loop_local_memory_ops"]) \
        == (4, 1, 1, 1)
    assert len(main_loop(sass_instructions(LISTING, "other"))) == 2  # a jump back to address 0 is a loop too
    assert main_loop(sass_instructions(LISTING, "flat")) == []  # the branch to itself after EXIT is no loop
    assert sass_stats(sass_instructions(LISTING, "flat"))["loop_instructions"] is None
    with pytest.raises(RuntimeError, match="no function missing"):
        sass_instructions(LISTING, "missing")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_loop_of_dots_and_exps_shows_its_tensor_core_and_mufu_instructions(toy_rows, arch):
    row = toy_rows["exp_matmul", arch]
    assert row["problems"] == []
    assert 0 < row["loop_instructions"] < row["instructions"]
    # Every thread of the 4 warps takes exp2 of its 64 * 64 / 128 = 32 elements each iteration: one MUFU each.
    assert row["loop_mufu"] >= 32
    if arch == 80:
        assert row["loop_hmma"] > 0 and row["hgmma_ops"] == 0
    else:  # a 64-row tile per warpgroup runs on wgmma, no mma.sync fallback
        assert row["loop_hgmma"] > 0 and row["hmma_ops"] == 0
    assert row["loop_instructions_per_element"] == round(row["loop_instructions"] * 32 * 4 / (64 * 64), 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_loop_free_and_spilling_kernels(toy_rows, arch):
    scale, hog = toy_rows["scale", arch], toy_rows["register_hog", arch]
    assert scale["loop_instructions"] is None and scale["instructions"] > 0
    assert scale["loop_instructions_per_element"] is None  # its spec states no element count
    assert hog["local_memory_ops"] > 0 and scale["local_memory_ops"] == 0
