"""The efficient-training methods against their baselines, each measured in one run: progressive stacking (from
scratch, the shallow-only control, optimizer state reset; each fine-tuned on Rotten Tomatoes), multi-exit early
exit (RomeBERT on MiniLM, early exit against all layers) and EarlyBERT (full fine-tuning, the early-bird ticket,
a random ticket of the same sizes; in pre-training, the full model, the ticket at equal steps and equal time, the
ticket's sizes from scratch).

    bertforge bench methods --out report/bench                     # about 75 min on a 2-core CPU
    bertforge bench methods --out DIR -- --methods-scale tiny      # seconds: checks the harness end to end

Each case is one round of the whole experiment (pytest-benchmark's time is its wall-clock); its results (the
method's table, its plots under --out) go into extra_info, and `bertforge bench` puts them in report.md. A plain
`pytest` (benchmarks disabled) skips them: they train for minutes.
"""

from pathlib import Path

import numpy as np
import pytest

from bertforge.bench import earlybird, earlybird_pretrain, multi_exit, stacking

pytestmark = pytest.mark.usefixtures("cpu_reference_kernels")

GROUP = "methods"


@pytest.fixture
def methods(request, tmp_path):
    """(scale, folder for the experiments' reports): --methods-scale and --methods-out, else small and tmp_path."""
    if request.config.getoption("benchmark_disable"):
        pytest.skip("the method experiments train for minutes; they run with --benchmark-enable")
    out = request.config.getoption("methods_out")
    return request.config.getoption("methods_scale"), Path(out) if out else tmp_path


def record(benchmark, out: Path, table: str, plots: list[Path], **info):
    benchmark.group = GROUP
    benchmark.extra_info.update(table=table, plots=[str(p.relative_to(out)) for p in plots if p.exists()], **info)


def test_stacking(benchmark, methods):
    scale, out = methods
    folder = out / "stacking"
    result = benchmark.pedantic(stacking.run, kwargs=dict(scale=scale, out=str(folder), progress=False), rounds=1,
                                iterations=1)
    record(benchmark, out, stacking.markdown(result), [folder / "stacking.png"], provider="stacking",
           speedup_to_target=result["speedup_to_target"], verdict=result["verdict"])
    assert result["time_to_target_s"][stacking.SCRATCH] is not None


def test_multi_exit(benchmark, methods):
    scale, out = methods
    if scale != "small":
        pytest.skip("multi-exit runs MiniLM on Rotten Tomatoes: --methods-scale small only")
    folder = out / "multi-exit"
    result = benchmark.pedantic(multi_exit.run, args=(folder, ["romebert"]), kwargs=dict(epochs=1, baselines=False),
                                rounds=1, iterations=1)
    final = result["runs"]["romebert"]["test_exit_accuracy"][-1]
    chosen = {criterion: multi_exit.chosen_rule(rows, final) for criterion, rows in result["speed"]["romebert"].items()}
    record(benchmark, out, multi_exit.markdown(result), [folder / "multi_exit.png", folder / "serving.png"],
           provider="romebert", speed_up_within_a_point={c: r["speed_up"] for c, r in chosen.items()})
    assert final > 0.7  # well above the majority class (0.596 of the test split)


def test_earlybird(benchmark, methods):
    scale, out = methods
    if scale != "small":
        pytest.skip("EarlyBERT runs MiniLM on Rotten Tomatoes: --methods-scale small only")
    folder = out / "earlybird"
    result = benchmark.pedantic(earlybird.run, args=(folder,), kwargs=dict(epochs=2), rounds=1, iterations=1)
    record(benchmark, out, earlybird.markdown(result), [folder / "accuracy_vs_time.png", folder / "mask_distance.png"],
           provider="earlybird", time_saved=result["time_saved"], test_accuracy=result["test_accuracy"])
    assert result["test_accuracy"][earlybird.EARLYBIRD] > 0.7


def test_earlybird_pretraining(benchmark, methods):
    scale, out = methods
    folder = out / "earlybird-pretrain"
    result = benchmark.pedantic(earlybird_pretrain.run, args=(folder, scale), rounds=1, iterations=1)
    record(benchmark, out, earlybird_pretrain.markdown(result), [folder / "loss_vs_time.png",
                                                                 folder / "mask_distance.png"],
           provider="earlybird-pretrain", time_saved=result["time_saved"], heldout_loss=result["heldout_loss"],
           width_matters=result["width_matters"])
    assert all(np.isfinite(loss) for loss in result["heldout_loss"].values())
