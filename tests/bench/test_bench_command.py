"""`bertforge bench`: a real (small) run through pytest-benchmark writes its report and plot, --compare finds a
slower case and not a repeated one, and a user's mistakes end in one line."""

import copy
import json

import pytest

from bertforge.bench import command
from bertforge.cli import main


def test_a_model_run_writes_results_report_and_plot_then_compares(tmp_path, capfd):
    out = tmp_path / "run"
    cases = "(test_mlm_train_step and corpus and not compile and not unfused) or ceiling"
    assert main(["bench", "model", "--out", str(out), "--", "-k", cases]) == 0
    printed = capfd.readouterr().out
    assert "bertforge bench model: 3 cases, about" in printed and "PASSED" in printed
    run = json.loads((out / "benchmark.json").read_text())
    medians = {b["extra_info"]["provider"]: b["stats"]["median"] for b in run["benchmarks"]}
    assert set(medians) == {"bertforge", "transformers-sdpa", "torch.mm 2048"}
    report = (out / "report.md").read_text()
    assert f"| transformers-sdpa | {medians['transformers-sdpa'] * 1e3:.2f} |" in report
    assert f"{medians['transformers-sdpa'] / medians['bertforge']:.2f}x" in report
    assert (out / "speedups.png").stat().st_size > 10_000
    gflops = {b["extra_info"]["provider"]: b["extra_info"]["GFLOP/s"] for b in run["benchmarks"]}
    assert f"| bertforge | {gflops['bertforge']:.1f} | {gflops['bertforge'] / gflops['torch.mm 2048']:.2f} |" in report

    # The run against itself: nothing slower. A copy with one case twice as slow: that case, and exit status 1.
    assert main(["bench", "--compare", str(out / "benchmark.json"), "--against", str(out / "benchmark.json"),
                 "--out", str(tmp_path / "same")]) == 0
    assert "within spread" in (tmp_path / "same" / "compare.md").read_text()
    slower = copy.deepcopy(run)
    case = slower["benchmarks"][0]
    for key in ("min", "max", "mean", "median"):
        case["stats"][key] *= 2.5
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    assert main(["bench", "--compare", str(out / "benchmark.json"), "--against", str(tmp_path / "slower.json"),
                 "--out", str(tmp_path / "cmp")]) == 1
    table = (tmp_path / "cmp" / "compare.md").read_text()
    first_row = table.splitlines()[2]
    assert case["fullname"] in first_row and "2.500x" in first_row and "slower" in first_row


def test_a_tiny_methods_run_puts_each_experiments_table_and_plots_in_the_report(tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["bench", "methods", "--out", str(out), "--", "--methods-scale", "tiny"]) == 0
    assert "multi-exit runs MiniLM on Rotten Tomatoes" in capfd.readouterr().out  # skipped with its reason
    cases = {case["name"]: case for case in json.loads((out / "benchmark.json").read_text())["benchmarks"]}
    assert set(cases) == {"test_stacking", "test_earlybird_pretraining"}
    saved = json.loads((out / "stacking" / "stacking.json").read_text())
    assert cases["test_stacking"]["extra_info"]["speedup_to_target"] == saved["speedup_to_target"]
    saved = json.loads((out / "earlybird-pretrain" / "results.json").read_text())
    assert cases["test_earlybird_pretraining"]["extra_info"]["time_saved"] == saved["time_saved"]
    report = (out / "report.md").read_text()
    for folder, table, plot in (("stacking", "stacking.md", "stacking.png"),
                                ("earlybird-pretrain", "results.md", "loss_vs_time.png")):
        assert (out / folder / table).read_text().strip() in report
        assert f"![{folder}/{plot}]({folder}/{plot})" in report
        assert (out / folder / plot).stat().st_size > 10_000


def test_estimate_uses_an_earlier_run_of_the_same_cases():
    earlier = {"benchmarks": [{"fullname": "bertforge/bench/bench_model.py::test_x[a]",
                               "stats": {"total": 3.0, "mean": 0.5}}]}
    cases = ["bench_model.py::test_x[a]", "bench_model.py::test_x[b]", "bench_kernels.py::test_k[c]"]
    seconds, how = command.estimate_s(cases, earlier, has_gpu=False)
    assert seconds == 3.5 + command.GUESS_S["bench_model.py"] and how == ("1 of 3 cases timed in the earlier run; "
                                                                          "1 GPU cases skip on this machine")
    seconds, how = command.estimate_s(cases, earlier, has_gpu=True)
    assert seconds == 3.5 + command.GUESS_S["bench_model.py"] + command.GUESS_S["bench_kernels.py"]
    assert how == "1 of 3 cases timed in the earlier run"


@pytest.mark.parametrize("argv, expected", [
    (["nope"], "unknown suite 'nope'"),
    (["--compare", "{missing}"], "cannot read benchmark results"),
    (["--compare", "{not_bench}", "--against", "{not_bench}"], "is not a pytest-benchmark JSON file"),
    (["--against", "{not_bench}"], "--against needs --compare"),
])
def test_mistakes_end_in_one_line(tmp_path, argv, expected):
    (tmp_path / "other.json").write_text('{"steps": 3}')
    names = {"missing": str(tmp_path / "none.json"), "not_bench": str(tmp_path / "other.json")}
    with pytest.raises(SystemExit) as error:
        main(["bench", *[a.format(**names) for a in argv], "--out", str(tmp_path / "out")])
    message = str(error.value.code)
    assert message.startswith("bertforge bench: ") and expected in message and "\n" not in message
