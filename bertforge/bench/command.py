"""`bertforge bench`: every benchmark suite through pytest-benchmark, one report, and regressions against a past run.

    bertforge bench                      # all suites; GPU cases skip with their reason on a machine without one
    bertforge bench model --out report/bench
    bertforge bench methods --out report/bench                # stacking, multi-exit, EarlyBERT: ~75 min on 2 cores
    bertforge bench --compare OLD.json --out runs/bench-new                   # run, then compare with that run
    bertforge bench --compare OLD.json --against NEW.json                     # compare two runs, run nothing

Writes into --out: benchmark.json (pytest-benchmark's raw results), report.md (per group: each provider's median,
its spread over rounds, its time as a ratio to bertforge's in the same run, throughput; each method experiment's
own table and plots) and speedups.png; with --compare, compare.md. Needs the dev extra (pytest-benchmark).
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from bertforge.train.figures import saved_figure

from .ratios import BASELINE, THROUGHPUT_KEYS

HERE = Path(__file__).parent
SUITES = {"kernels": ["bench_kernels.py"], "model": ["bench_model.py", "bench_finetune.py", "bench_model_gpu.py"],
          "methods": ["bench_methods.py"]}
# Seconds per case when no earlier run in --out says better: a rough guess for the estimate printed first.
GUESS_S = {"bench_kernels.py": 5.0, "bench_model.py": 60.0, "bench_finetune.py": 40.0, "bench_model_gpu.py": 30.0,
           "bench_methods.py": 900.0}
GPU_ONLY = {"bench_kernels.py", "bench_model_gpu.py"}  # every case of these skips without a CUDA device


class BenchError(ValueError):
    """A user's mistake: one line, no traceback."""


def suite_files(suite: str) -> list[str]:
    if suite == "all":
        return [f for files in SUITES.values() for f in files]
    if suite not in SUITES:
        raise BenchError(f"unknown suite {suite!r}; choose from {[*SUITES, 'all']}")
    return SUITES[suite]


def pytest_command(files: list[str], *extra: str) -> list[str]:
    """pytest on the suite files with benchmarks on (the project's pytest.ini switches them off)."""
    return [sys.executable, "-m", "pytest", *(str(HERE / f) for f in files), "-o", "addopts=",
            "--benchmark-enable", "-p", "no:cacheprovider", *extra]


def collect(files: list[str], extra: list[str]) -> list[str]:
    """The case ids pytest would run."""
    done = subprocess.run(pytest_command(files, "--collect-only", "-q", *extra), capture_output=True, text=True)
    if done.returncode not in (0, 5):
        raise BenchError(f"the benchmark suites do not collect:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return [line for line in done.stdout.splitlines() if "::" in line]


def estimate_s(cases: list[str], previous: dict | None, has_gpu: bool) -> tuple[float, str]:
    """Seconds the run should take: each case's time in an earlier run in the same folder, else a guess (none
    for a GPU-only case on a machine without a GPU: it skips)."""
    seen = {}
    for b in (previous or {}).get("benchmarks", []):
        seen[b["fullname"].split("::", 1)[-1]] = b["stats"]["total"] + b["stats"]["mean"]  # + a warm-up round
    total, known, skipping = 0.0, 0, 0
    for case in cases:
        key, file = case.split("::", 1)[-1], Path(case.split("::")[0]).name
        if file in GPU_ONLY and not has_gpu:
            skipping += 1
        elif key in seen:
            total, known = total + seen[key], known + 1
        else:
            total += GUESS_S.get(file, 10.0)
    how = f"{known} of {len(cases)} cases timed in the earlier run" if known else "a rough guess per case"
    return total, how + (f"; {skipping} GPU cases skip on this machine" if skipping else "")


def load_run(path) -> dict:
    path = Path(path)
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BenchError(f"cannot read benchmark results {path}: {error}") from None
    if not isinstance(run, dict) or not isinstance(run.get("benchmarks"), list):
        raise BenchError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return run


def spread(b: dict) -> float:
    """Spread over rounds relative to the median: the interquartile range (min-max with fewer than 4 rounds)."""
    s = b["stats"]
    width = s["iqr"] if s["rounds"] >= 4 else s["max"] - s["min"]
    return width / s["median"]


def groups_of(run: dict) -> dict[str, list[dict]]:
    groups = {}
    for b in run["benchmarks"]:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    return groups


def provider(b: dict) -> str:
    return b.get("extra_info", {}).get("provider", b["name"])


def report_markdown(run: dict) -> str:
    """Per group: provider, median, spread, time / bertforge's time (same run), throughput."""
    machine = run.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
             f"python {machine.get('python_version', '?')}; {run.get('datetime', '')}", ""]
    for group, benchmarks in groups_of(run).items():
        if all("table" in b.get("extra_info", {}) for b in benchmarks):
            lines += method_sections(benchmarks)
            continue
        base = next((b for b in benchmarks if provider(b) == BASELINE), None)
        lines += [f"### {group}", "", f"| provider | median ms | spread | time / {BASELINE} | throughput |",
                  "|---|---|---|---|---|"]
        for b in sorted(benchmarks, key=lambda b: (provider(b) != BASELINE, b["stats"]["median"])):
            ratio = f"{b['stats']['median'] / base['stats']['median']:.2f}x" if base else "-"
            info = b.get("extra_info", {})
            throughput = ", ".join(f"{info[k]:.1f} {k}" for k in THROUGHPUT_KEYS if k in info)
            if "fraction_of_peak" in info:
                throughput += f" ({100 * info['fraction_of_peak']:.0f}% of the data-sheet peak)"
            lines.append(f"| {provider(b)} | {b['stats']['median'] * 1e3:.2f} | ±{100 * spread(b) / 2:.1f}% | "
                         f"{ratio} | {throughput} |")
        lines.append("")
    for unit in ("GFLOP/s", "TFLOP/s", "GB/s"):  # against the ceilings measured in the same run
        ceiling = next((b for b in run["benchmarks"] if b.get("extra_info", {}).get("ceiling")
                        and unit in b["extra_info"]), None)
        if ceiling is None:
            continue
        top = ceiling["extra_info"][unit]
        lines += [f"### Fraction of the measured ceiling: {top:.1f} {unit} ({provider(ceiling)})", "",
                  f"| group | provider | {unit} | fraction |", "|---|---|---|---|"]
        lines += [f"| {b.get('group')} | {provider(b)} | {b['extra_info'][unit]:.1f} | "
                  f"{b['extra_info'][unit] / top:.2f} |" for b in run["benchmarks"]
                  if b is not ceiling and unit in b.get("extra_info", {})]
        lines.append("")
    return "\n".join(lines)


def method_sections(benchmarks: list[dict]) -> list[str]:
    """A method experiment's own table (its ratios, all measured in its one run) and its plots."""
    lines = []
    for b in benchmarks:
        info = b["extra_info"]
        lines += [f"### {b['name']}: {info.get('provider', '')} ({b['stats']['median'] / 60:.1f} min)", "",
                  info["table"], ""]
        lines += [f"![{plot}]({plot})" for plot in info.get("plots", [])] + [""]
    return lines


def plot_speedups(run: dict, path: Path) -> bool:
    """Bars per group: each provider's time over bertforge's (above 1: bertforge is faster). False if no group
    has a bertforge case."""
    rows = []
    for group, benchmarks in groups_of(run).items():
        base = next((b for b in benchmarks if provider(b) == BASELINE), None)
        if base:
            rows += [(group, provider(b), b["stats"]["median"] / base["stats"]["median"]) for b in benchmarks
                     if b is not base]
    if not rows:
        return False
    labels = [f"{group}: {name}" for group, name, _ in rows]
    with saved_figure(path, figsize=(8, 0.35 * len(rows) + 1.5)) as (fig, ax):
        ax.barh(range(len(rows)), [r for _, _, r in rows], color=["tab:green" if r >= 1 else "tab:red"
                                                                 for _, _, r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set(xlabel=f"provider time / {BASELINE} time, same run (above 1: {BASELINE} faster)",
               title="bertforge against its baselines")
    return True


def compare(old: dict, new: dict) -> tuple[str, int]:
    """Markdown table of every case in both runs, slowest change first, and how many got slower beyond the
    spread of their rounds (new median above old median by more than the larger of the two spreads)."""
    before = {b["fullname"]: b for b in old["benchmarks"]}
    rows = []
    for b in new["benchmarks"]:
        a = before.get(b["fullname"])
        if a is None:
            continue
        ratio = b["stats"]["median"] / a["stats"]["median"]
        noise = max(spread(a), spread(b))
        verdict = "slower" if ratio - 1 > noise else "faster" if 1 - ratio > noise else "within spread"
        rows.append((ratio, b["fullname"], a["stats"]["median"], b["stats"]["median"], noise, verdict))
    rows.sort(reverse=True)
    lines = ["| case | old ms | new ms | new / old | spread | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {o * 1e3:.2f} | {n * 1e3:.2f} | {r:.3f}x | ±{100 * s:.1f}% | {v} |"
              for r, name, o, n, s, v in rows]
    missing = len(before.keys() - {b["fullname"] for b in new["benchmarks"]})
    if missing:
        lines += ["", f"{missing} case(s) of the old run are not in the new one."]
    slower = sum(v == "slower" for *_, v in rows)
    if not rows:
        lines += ["", "No case is in both runs."]
    return "\n".join(lines) + "\n", slower


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertforge bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="all", help=f"one of {[*SUITES, 'all']} (default: all)")
    parser.add_argument("--out", default=".", help="folder for benchmark.json, report.md and the plots")
    parser.add_argument("--compare", metavar="OLD.json", help="an earlier run's benchmark.json to compare with")
    parser.add_argument("--against", metavar="NEW.json", help="with --compare: compare two runs, run nothing")
    parser.epilog = "Arguments after -- go to pytest, e.g. bertforge bench model -- -k 'not compile'."
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.pytest_args = argv[cut + 1:]
    try:
        return _run(args)
    except BenchError as error:
        raise SystemExit(f"bertforge bench: {error}") from None


def _run(args) -> int:
    out = Path(args.out)
    old = load_run(args.compare) if args.compare else None
    if args.against:
        if old is None:
            raise BenchError("--against needs --compare OLD.json")
        return _write_compare(old, load_run(args.against), out)
    files = suite_files(args.suite)
    extra = args.pytest_args
    out.mkdir(parents=True, exist_ok=True)
    results = out / "benchmark.json"
    previous = load_run(results) if results.exists() else None
    cases = collect(files, extra)
    import torch  # only once the arguments are known to be good: it takes seconds to import

    seconds, how = estimate_s(cases, previous, torch.cuda.is_available())
    print(f"bertforge bench {args.suite}: {len(cases)} cases, about {math.ceil(seconds / 60)} min ({how})",
          flush=True)
    # -v: a progress line per case; -rs: each skipped case with its reason.
    methods = [f"--methods-out={out}"] if "bench_methods.py" in files else []
    command = pytest_command(files, "-v", "-rs", f"--benchmark-json={results}", *methods, *extra)
    code = subprocess.run(command).returncode
    if code not in (0, 5) or not results.exists():
        raise BenchError(f"the benchmarks failed (pytest exit status {code}); see its output above")
    run = load_run(results)
    (out / "report.md").write_text(report_markdown(run))
    plotted = plot_speedups(run, out / "speedups.png")
    print(f"wrote {results}, {out / 'report.md'}" + (f", {out / 'speedups.png'}" if plotted else ""))
    return _write_compare(old, run, out) if old else 0


def _write_compare(old: dict, new: dict, out: Path) -> int:
    table, slower = compare(old, new)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    print(table + f"\n{slower} case(s) slower beyond the spread of their rounds; written to {out / 'compare.md'}")
    return 1 if slower else 0
