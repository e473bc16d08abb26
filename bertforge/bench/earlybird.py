"""EarlyBERT against full fine-tuning, measured in one run (MiniLM on Rotten Tomatoes by default).

    python -m bertforge.bench.earlybird --out report/earlybird          # about 20 min on a 2-core CPU
    bertforge bench methods --out report/bench                           # the same, a case of the methods suite

Three runs with the same epochs, batch, learning rate (each decayed to zero in its own budget) and seed:
  full       `bertforge finetune`: every head and neuron;
  earlybird  `bertforge earlybird`: the search with slimming coefficients until the early-bird ticket settles,
             then the pre-search weights pruned to it (a third of each layer's heads, 40% of all FFN neurons) and
             fine-tuned;
  random     the same number of heads and neurons per layer chosen at random, fine-tuned the same way (does the
             drawn ticket matter?).
Reported: test accuracy of each best dev model, training time (evaluation excluded; earlybird: search + retraining)
and the time saved against full, in results.json and results.md; plots: dev accuracy against training time
(accuracy_vs_time.png) and the search's mask-distance curve (mask_distance.png).
"""

import argparse
import json
import shutil
from pathlib import Path

from bertforge.train.earlybird import EarlybirdConfig, earlybird
from bertforge.train.figures import saved_figure
from bertforge.train.finetune import FinetuneConfig, finetune

FULL, EARLYBIRD, RANDOM = "full", "earlybird", "random ticket"


def eval_curve(run_dir: Path, offset: float = 0.0) -> list[tuple[float, float]]:
    """(training seconds, dev accuracy) of each evaluation in a fine-tuning run's log."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(offset + r["train_time"], r["accuracy"]) for r in records if r["kind"] == "eval"]


def run(out: Path, epochs: int = 2, progress: bool = False, ticket: dict | None = None, **settings) -> dict:
    """The three runs into out/<name>; `settings` go to every run (e.g. checkpoint, data, batch_size, lr), `ticket`
    to the EarlyBERT ones only (e.g. record_interval, threshold)."""
    out.mkdir(parents=True, exist_ok=True)
    common = dict(epochs=epochs, progress=progress, overwrite=True, **settings)
    full = finetune(FinetuneConfig(out_dir=str(out / "full"), **common))
    searched = earlybird(EarlybirdConfig(out_dir=str(out / "earlybird"), **common, **(ticket or {})))
    random = earlybird(EarlybirdConfig(out_dir=str(out / "random"), ticket_from=str(out / "earlybird"),
                                       random_ticket=True, **common, **(ticket or {})))
    drawn = json.loads((out / "earlybird" / "ticket.json").read_text())
    result = {
        "settings": {"epochs": epochs, **{k: v for k, v in settings.items() if k not in ("checkpoint", "data")}},
        "ticket": {k: drawn[k] for k in ("step", "drawn_by", "heads_per_layer", "intermediate_size_per_layer")},
        "test_accuracy": {FULL: full.get("test_accuracy"), EARLYBIRD: searched["test_accuracy"],
                          RANDOM: random["test_accuracy"]},
        "train_time_s": {FULL: full["train_time"], EARLYBIRD: searched["total_train_time"],
                         RANDOM: random["total_train_time"]},
        "search_time_s": searched["search_train_time"],
        "curves": {FULL: eval_curve(out / "full"),
                   EARLYBIRD: eval_curve(out / "earlybird" / "retrain", searched["search_train_time"]),
                   RANDOM: eval_curve(out / "random" / "retrain")},
    }
    result["time_saved"] = 1 - result["train_time_s"][EARLYBIRD] / result["train_time_s"][FULL]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "accuracy_vs_time.png")
    shutil.copy(out / "earlybird" / "mask_distance.png", out / "mask_distance.png")
    return result


def markdown(result: dict) -> str:
    fmt = lambda a: "-" if a is None else f"{a:.4f}"  # noqa: E731
    lines = ["| run | test accuracy | training time | time saved against full |", "|---|---|---|---|"]
    for name in (FULL, EARLYBIRD, RANDOM):
        seconds = result["train_time_s"][name]
        saved = 1 - seconds / result["train_time_s"][FULL]
        lines.append(f"| {name} | {fmt(result['test_accuracy'][name])} | {seconds:.0f} s"
                     + (f" ({result['search_time_s']:.0f} s search)" if name == EARLYBIRD else "")
                     + f" | {'-' if name == FULL else f'{100 * saved:.0f}%'} |")
    return "\n".join(lines + [""] + ticket_and_settings(result)) + "\n"


def ticket_and_settings(result: dict) -> list[str]:
    """The report lines that say where the ticket was drawn, its sizes, and the runs' settings."""
    ticket = result["ticket"]
    return [f"Ticket drawn at step {ticket['step']} ({ticket['drawn_by']}): heads per layer "
            f"{ticket['heads_per_layer']}, FFN neurons per layer {ticket['intermediate_size_per_layer']}.",
            "Settings: " + ", ".join(f"{k} {v}" for k, v in result["settings"].items()) + "."]


def plot(result: dict, path: Path):
    with saved_figure(path, figsize=(7, 4.2)) as (fig, ax):
        for name, curve in result["curves"].items():
            if curve:
                ax.plot(*zip(*curve), marker="o", markersize=3,
                        label=f"{name} (test {result['test_accuracy'][name]:.3f})")
        ax.axvline(result["search_time_s"], color="gray", linestyle=":", label="earlybird: end of the search")
        ax.set(xlabel="training time (s, evaluation excluded)", ylabel="dev accuracy",
               title="EarlyBERT against full fine-tuning")
        ax.legend(fontsize=8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="report/earlybird")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    print(markdown(run(Path(args.out), args.epochs, args.progress)))


if __name__ == "__main__":
    main()
