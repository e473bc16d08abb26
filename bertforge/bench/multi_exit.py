"""Multi-exit BERT on a real task: every recipe's per-exit accuracy and training cost, then early-exit inference
speed against running all layers, batched, measured side by side.

    python -m bertforge.bench.multi_exit --out report/multi-exit        # MiniLM on Rotten Tomatoes, every recipe

1. Sanity baselines on the same test split, computed here: majority class, TF-IDF + logistic regression and
   frozen MiniLM (mean-pooled last layer) + logistic regression (scikit-learn: pip install -e ".[bench]").
2. `bertforge finetune` with each recipe (final, deebert, pabee, romebert, romebert with gradient projection),
   the same epochs, batch and learning rate, each decayed to zero in its own budget; test accuracy per exit of
   the best dev model; training wall-clock (deebert: both stages).
3. For each multi-exit model and criterion (entropy, confidence, patience), a sweep of thresholds: test accuracy
   and the wall-clock of batched early exit (batch 32) over the test set, against the same model running all
   layers (its final classifier only) on the same batches, timed before and after each criterion's sweep in the
   same run; speed-up = mean time of all layers / time of early exit.
4. Serving a stream (the test set in a shuffled order, as requests would come): sequences/s of all layers and of
   shrinking-batch early exit, both on batches of 32 in arrival order, and of per-layer pools of 32
   (pooled_early_exit), in one run, for each criterion at its fastest sweep setting within a point of all
   layers' accuracy (the three early-exit ways give the same predictions).
Writes results.json, results.md and plots (accuracy per exit, accuracy against speed-up) into --out.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bertforge.model import BertForSequenceClassification, BertModel, MultiExitBert, early_exit, pooled_early_exit
from bertforge.train import corpus
from bertforge.train.classification_data import classification_batches, rotten_tomatoes
from bertforge.train.figures import saved_figure
from bertforge.train.finetune import FinetuneConfig, finetune
from bertforge.train.tokenizer import load_tokenizer

RECIPES = {"final": dict(recipe="final"), "deebert": dict(recipe="deebert"), "pabee": dict(recipe="pabee"),
           "romebert": dict(recipe="romebert"), "romebert-gp": dict(recipe="romebert", gradient_projection=True)}
SWEEPS = {"entropy": [0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],  # papers.md 2(b)
          "confidence": [1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6],
          "patience": [5, 4, 3, 2, 1]}
BATCH = 32


def sanity_baselines(splits) -> dict:
    """Majority class, TF-IDF + LR and frozen MiniLM mean-pool + LR, fitted on train, scored on test."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = splits["train"], splits["test"]
    majority = np.bincount(train.labels).argmax()
    results = {"majority": float(np.mean(np.array(test.labels) == majority))}
    tfidf = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    classifier = LogisticRegression(max_iter=2000, C=4.0).fit(tfidf.fit_transform(train.texts), train.labels)
    results["tfidf_logistic_regression"] = float(classifier.score(tfidf.transform(test.texts), test.labels))
    encoder, tokenizer = BertModel.from_pretrained(corpus.minilm_checkpoint()).eval(), load_tokenizer()

    def embed(data):
        rows = []
        with torch.no_grad():
            for batch in classification_batches(data, tokenizer, 64, 128):
                h = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                rows.append((h * mask).sum(1) / mask.sum(1))
        return torch.cat(rows).numpy()

    frozen = LogisticRegression(max_iter=2000).fit(embed(train), train.labels)
    results["frozen_minilm_logistic_regression"] = float(frozen.score(embed(test), test.labels))
    return results


def train_recipes(out: Path, names, epochs: int, exit_pooling: str, head_lr: float, progress: bool,
                  reuse: bool) -> dict:
    """Fine-tune each recipe into out/runs/<name>; with reuse, a recipe whose run finished before is read back."""
    runs = {}
    for name in names:
        folder = out / "runs" / name
        record = folder / "bench.json"
        if reuse and record.exists():
            runs[name] = json.loads(record.read_text())
            print(f"{name}: reused {record}", flush=True)
            continue
        pooling = {} if name == "final" else {"exit_pooling": exit_pooling}
        cfg = FinetuneConfig(out_dir=str(folder), overwrite=True, epochs=epochs, head_lr=head_lr, progress=progress,
                             **RECIPES[name], **pooling)
        summary = finetune(cfg)
        runs[name] = {"test_exit_accuracy": summary["test_exit_accuracy"], "train_seconds": summary["train_time"],
                      "steps": summary["step"], "best": str(folder / "best")}
        record.write_text(json.dumps(runs[name], indent=1))
        print(f"{name}: test accuracy per exit {np.round(summary['test_exit_accuracy'], 4).tolist()}, "
              f"{summary['train_time']:.0f} s of training", flush=True)
    return runs


def _timed(fn, batches) -> tuple[float, list]:
    started, outputs = time.perf_counter(), [fn(b) for b in batches]
    return time.perf_counter() - started, outputs


def all_layers_predictions(model: MultiExitBert, b: dict) -> torch.Tensor:
    """Every layer run, the final classifier only (BertForSequenceClassification's forward: no exits)."""
    return BertForSequenceClassification.forward(model, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                                 packing=b["packing"]).logits.argmax(-1)


def rule_of(criterion: str, value) -> dict:
    """early_exit's keyword arguments for one sweep setting."""
    return {"criterion": criterion, ("patience" if criterion == "patience" else "threshold"): value}


def early_exit_batch(model: MultiExitBert, b: dict, rule: dict):
    return early_exit(model, b["input_ids"], b["attention_mask"], b["token_type_ids"], packing=b["packing"], **rule)


def speed_sweep(model: MultiExitBert, batches, labels: torch.Tensor, criteria) -> dict:
    """Accuracy, mean exit layer and speed-up over all layers for each criterion and threshold."""
    def all_layers(b):
        return all_layers_predictions(model, b)

    results = {}
    with torch.no_grad():
        _timed(all_layers, batches)  # warm-up
        for criterion in criteria:
            before, _ = _timed(all_layers, batches)  # timed before and after the sweep: the machine drifts
            rows = []
            for value in SWEEPS[criterion]:
                rule = rule_of(criterion, value)
                seconds, outs = _timed(lambda b: early_exit_batch(model, b, rule), batches)
                predictions = torch.cat([o.predictions for o in outs])
                layers = torch.cat([o.exit_layers for o in outs]).float()
                rows.append({"value": value, "accuracy": float((predictions == labels).float().mean()),
                             "mean_exit_layer": float(layers.mean()), "seconds": seconds})
            after, _ = _timed(all_layers, batches)
            for row in rows:
                row.update(all_layers_seconds=(before + after) / 2, speed_up=(before + after) / 2 / row["seconds"])
            results[criterion] = rows
    return results


def chosen_rule(rows: list[dict], all_layers_accuracy: float) -> dict:
    """The sweep row with the largest speed-up within one point of all layers' accuracy (else the most accurate)."""
    close = [r for r in rows if r["accuracy"] >= all_layers_accuracy - 0.01]
    return max(close, key=lambda r: r["speed_up"]) if close else max(rows, key=lambda r: r["accuracy"])


def serving_throughput(model: MultiExitBert, stream, criterion: str, value) -> dict:
    """Sequences/s and accuracy of all layers, shrinking-batch early exit and per-layer pools on one stream of
    requests (`stream`: a LabelledData in arrival order), each way timed in turn on the same machine."""
    tokenizer = load_tokenizer()
    batches = list(classification_batches(stream, tokenizer, BATCH, 128))
    requests = [b["input_ids"][0, :int(b["attention_mask"].sum())]  # one unpadded sequence each
                for b in classification_batches(stream, tokenizer, 1, 128)]
    labels = torch.tensor(stream.labels)
    rule = rule_of(criterion, value)

    def all_layers():
        return torch.cat([all_layers_predictions(model, b) for b in batches])

    def shrinking():
        return torch.cat([early_exit_batch(model, b, rule).predictions for b in batches])

    def pools():
        predictions = torch.empty_like(labels)
        for index, prediction, _ in pooled_early_exit(model, iter(requests), BATCH, **rule):
            predictions[index] = prediction
        return predictions

    results = {"criterion": criterion, "value": value, "requests": len(requests)}
    with torch.no_grad():
        all_layers()  # warm-up
        for name, serve in (("all_layers", all_layers), ("shrinking_batch", shrinking), ("pools", pools)):
            started = time.perf_counter()
            predictions = serve()
            seconds = time.perf_counter() - started
            results[name] = {"sequences_per_s": len(requests) / seconds,
                             "accuracy": float((predictions == labels).float().mean())}
    return results


def markdown(result: dict) -> str:
    lines = ["| baseline | test accuracy |", "|---|---|"] if result["baselines"] else []
    lines += [f"| {k} | {v:.4f} |" for k, v in result["baselines"].items()] + [""] * bool(result["baselines"])
    depth = max(len(r["test_exit_accuracy"]) for r in result["runs"].values())
    lines += ["| recipe | training s | s per epoch | " + " | ".join(f"exit {i + 1}" for i in range(depth)) + " |",
              "|---|---|---|" + "---|" * depth]
    for name, run in result["runs"].items():
        accuracy = run["test_exit_accuracy"]
        cells = [""] * (depth - len(accuracy)) + [f"{a:.4f}" for a in accuracy]
        epochs = result.get("epochs", 1) * (2 if RECIPES.get(name, {}).get("recipe") == "deebert" else 1)
        lines.append(f"| {name} | {run['train_seconds']:.0f} | {run['train_seconds'] / epochs:.0f} | "
                     + " | ".join(cells) + " |")
    for name, sweeps in result["speed"].items():
        final = result["runs"][name]["test_exit_accuracy"][-1]
        lines += ["", f"{name} (all layers: test accuracy {final:.4f})", "",
                  "| criterion | value | accuracy | mean exit layer | speed-up (batch 32) |", "|---|---|---|---|---|"]
        for criterion, rows in sweeps.items():
            lines += [f"| {criterion} | {r['value']} | {r['accuracy']:.4f} | {r['mean_exit_layer']:.2f} | "
                      f"{r['speed_up']:.2f}x |" for r in rows]
    for name, servings in result.get("serving", {}).items():
        lines += ["", f"{name}: serving the test set as a stream of requests, batch 32", "",
                  "| criterion | value | all layers seq/s | shrinking batch seq/s | pools seq/s | accuracy "
                  "(all / shrinking / pools) |", "|---|---|---|---|---|---|"]
        for r in servings:
            ways = [r[w] for w in ("all_layers", "shrinking_batch", "pools")]
            lines.append(f"| {r['criterion']} | {r['value']} | " + " | ".join(f"{w['sequences_per_s']:.1f}"
                                                                            for w in ways)
                         + " | " + " / ".join(f"{w['accuracy']:.4f}" for w in ways) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    speed = result["speed"]
    depth = max(len(run["test_exit_accuracy"]) for run in result["runs"].values())
    with saved_figure(path, 1, 1 + len(SWEEPS), figsize=(5 * (1 + len(SWEEPS)), 4.2)) as (fig, axes):
        for name, run in result["runs"].items():
            accuracy = run["test_exit_accuracy"]  # a plain model has only the last layer's classifier
            axes[0].plot(range(depth - len(accuracy) + 1, depth + 1), accuracy, marker="o", label=name)
        axes[0].set(xlabel="exit (layer)", ylabel="test accuracy", title="accuracy of each exit")
        axes[0].legend()
        for ax, criterion in zip(axes[1:], SWEEPS):
            for name, sweeps in speed.items():
                if criterion in sweeps:
                    rows = sweeps[criterion]
                    ax.plot([r["speed_up"] for r in rows], [r["accuracy"] for r in rows], marker=".", label=name)
            ax.axvline(2.0, color="grey", lw=0.8, ls=":")
            ax.set(xlabel="speed-up over all layers (batch 32, wall-clock)", ylabel="test accuracy", title=criterion)
            ax.legend()


def plot_serving(result: dict, path: Path):
    """Bars: sequences/s of all layers, shrinking batch and pools, per recipe and criterion."""
    cases = [(name, r) for name, rows in result.get("serving", {}).items() for r in rows]
    if not cases:
        return
    ways = {"all_layers": "all layers", "shrinking_batch": "shrinking batch", "pools": "per-layer pools"}
    with saved_figure(path, figsize=(max(6, 1.1 * len(cases)), 4.2)) as (fig, ax):
        for k, (way, label) in enumerate(ways.items()):
            ax.bar([i + (k - 1) * 0.27 for i in range(len(cases))], [r[way]["sequences_per_s"] for _, r in cases],
                   width=0.27, label=label)
        ax.set_xticks(range(len(cases)), [f"{name}\n{r['criterion']} {r['value']}" for name, r in cases],
                      fontsize=8)
        ax.set(ylabel="sequences / s", title="serving the test set as a stream, batch 32 (same predictions per rule)")
        ax.legend()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="report/multi-exit")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {list(RECIPES)}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--exit_pooling", default="mean", choices=["cls", "mean"],
                        help="what the early exits read (mean: MiniLM's early [CLS] rows carry nothing)")
    parser.add_argument("--head_lr", type=float, default=1e-3,
                        help="learning rate of the poolers and classifiers (MiniLM's pooler is nearly untrained)")
    parser.add_argument("--reuse", action="store_true", help="read back recipes already trained into --out")
    parser.add_argument("--report_only", action="store_true", help="rewrite results.md and the plots from "
                        "--out/results.json")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(json.loads((Path(args.out) / "results.json").read_text()), Path(args.out))
        return
    names = [n.strip() for n in args.recipes.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    print(markdown(run(Path(args.out), names, args.epochs, args.exit_pooling, args.head_lr, args.progress,
                       args.reuse)))


def run(out: Path, names, epochs: int = 3, exit_pooling: str = "mean", head_lr: float = 1e-3, progress: bool = False,
        reuse: bool = False, baselines: bool = True) -> dict:
    """Train each recipe in `names`, sweep and serve each multi-exit one; write results.json, results.md and the
    plots into `out`; baselines=False skips the scikit-learn sanity baselines."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    splits = rotten_tomatoes(seed=0)
    result = {"threads": torch.get_num_threads(), "epochs": epochs, "exit_pooling": exit_pooling,
              "head_lr": head_lr, "baselines": sanity_baselines(splits) if baselines else {}}
    print(f"baselines: {result['baselines']}", flush=True)
    result["runs"] = train_recipes(out, names, epochs, exit_pooling, head_lr, progress, reuse)
    tokenizer = load_tokenizer()
    batches = list(classification_batches(splits["test"], tokenizer, BATCH, 128))
    labels = torch.cat([b["labels"] for b in batches])
    stream = splits["test"].subset(np.random.default_rng(0).permutation(len(splits["test"])))
    result["speed"], result["serving"] = {}, {}
    for name in names:
        if name == "final":
            continue
        model = MultiExitBert.from_pretrained(result["runs"][name]["best"]).eval()
        result["speed"][name] = speed_sweep(model, batches, labels, list(SWEEPS))
        final_accuracy = result["runs"][name]["test_exit_accuracy"][-1]
        result["serving"][name] = [
            serving_throughput(model, stream, criterion, chosen_rule(rows, final_accuracy)["value"])
            for criterion, rows in result["speed"][name].items()]
        (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.json").write_text(json.dumps(result, indent=1))
    write_report(result, out, echo=False)
    return result


def write_report(result: dict, out: Path, echo: bool = True):
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "multi_exit.png")
    plot_serving(result, out / "serving.png")
    if echo:
        print(markdown(result))


if __name__ == "__main__":
    main()
