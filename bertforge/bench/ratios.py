"""Side-by-side ratios of the providers in each benchmark group, all measured in the same run.

A benchmark names its provider in `benchmark.extra_info["provider"]`; each group is compared against its
"bertforge" provider (groups without one are left out). Throughput figures in extra_info (TFLOP/s, GB/s, ...)
are shown beside the times.
"""

BASELINE = "bertforge"
THROUGHPUT_KEYS = ("TFLOP/s", "GFLOP/s", "GB/s", "tokens/s", "sequences/s")


def ratio_table(groups, baseline: str = BASELINE) -> str:
    """groups: [(group name, [benchmark, ...])] with benchmark["median"] in seconds and benchmark["extra_info"],
    as pytest-benchmark groups them. One block per group: provider, median ms, time / baseline time, throughput."""
    blocks = []
    for group, benchmarks in groups:
        runs = [b for b in benchmarks if b.get("path") is None]  # this run only, not runs loaded to compare
        base = next((b["median"] for b in runs if b["extra_info"].get("provider") == baseline), None)
        if base is None:
            continue
        lines = [f"{group}   (x = time / {baseline} time; above 1: {baseline} is faster)"]
        for b in sorted(runs, key=lambda b: (b["extra_info"].get("provider") != baseline, b["median"])):
            provider = b["extra_info"].get("provider", b["name"])
            ratio = f"{b['median'] / base:7.2f}x"
            throughput = "  ".join(f"{b['extra_info'][k]:8.1f} {k}" for k in THROUGHPUT_KEYS if k in b["extra_info"])
            lines.append(f"  {provider:<16} {b['median'] * 1e3:10.3f} ms {ratio}  {throughput}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
