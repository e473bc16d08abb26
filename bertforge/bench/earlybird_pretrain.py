"""EarlyBERT in pre-training against the full model, measured in one run on the packaged news corpus.

    python -m bertforge.bench.earlybird_pretrain --out report/bench/earlybird-pretrain   # ~25 min on a 2-core CPU
    python -m bertforge.bench.earlybird_pretrain --scale base --out runs/earlybird-base   # BERT-base, on a GPU
    bertforge bench methods --out report/bench                   # the same, a case of the methods suite

Four MLM runs of one model shape, seed, data order and learning rate (warmup, then linear decay to zero in each
run's own budget), each `bertforge pretrain --stages none`:
  full             every head and neuron, `steps` steps;
  earlybird        `--earlybird true`: the search with slimming coefficients until the early-bird ticket settles,
                   then the model pruned in place (a third of each layer's heads, 40% of all FFN neurons) and trained
                   on, `steps` steps in all;
  earlybird, full's time   the same with as many steps as fit in the full run's training time (estimated from the
                   first earlybird run's speed), the schedule decayed in that budget;
  pruned size      a model of the ticket's per-layer sizes trained from scratch for `steps` steps: does width matter at
                   this size? If it ends as low as the full model, the full model's width buys nothing here and a
                   ticket cannot show its worth.
Reported: held-out MLM loss and training time of each (evaluation excluded), the full model's loss at the earlybird
run's time (interpolated), the loss of word frequencies alone (below it a model has learned context), in
results.json and results.md; plots: held-out loss against training time
(loss_vs_time.png) and the search's mask-distance curve (mask_distance.png).
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from bertforge.bench.earlybird import ticket_and_settings
from bertforge.bench.stacking import eval_log, loss_at
from bertforge.model import IGNORE_INDEX
from bertforge.model.slimming import prune_to_sizes
from bertforge.train.figures import saved_figure
from bertforge.train.mlm import heldout_batches
from bertforge.train.pretrain import PretrainConfig, build_trainer, pretrain
from bertforge.train.run_folder import claim_run_folder
from bertforge.train.shards import build_shards

FULL, EARLYBIRD, EARLYBIRD_EQUAL_TIME, PRUNED_SIZE = "full", "earlybird", "earlybird, full's time", "pruned size"

SCALES = {
    # 4 layers of width 256 (8 heads of 32, MiniLM's head size), 64-token rows, a vocabulary learned from the corpus
    "small": dict(steps=1000, model=dict(num_layers=4, hidden_size=256, num_heads=8, intermediate_size=1024,
                                         max_seq_length=64, batch_size=32, vocab_size=8192, lr=1e-3, warmup_steps=50,
                                         eval_interval=50, eval_batches=16)),
    # BERT-base on one GPU at 1/20 of BERT's 400k steps, as the stacking benchmark's base scale: about 0.25 s a step
    # on an A100 in bf16, five to six hours for the four runs
    "base": dict(steps=20000, model=dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
                                         max_seq_length=128, batch_size=256, lr=1e-4, warmup_steps=1000,
                                         eval_interval=500, eval_batches=50, record_interval=100)),
    # the harness end to end in seconds, on the default vocabulary (its shards are shared with the stacking check)
    "tiny": dict(steps=40, model=dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                                      max_seq_length=32, batch_size=8, lr=1e-3, warmup_steps=5,
                                      eval_interval=10, eval_batches=2, record_interval=2, window=3, threshold=0.2)),
}


def unigram_loss(cfg: PretrainConfig) -> float:
    """The held-out MLM loss of word frequencies alone (each masked token predicted by its add-one smoothed frequency
    in the training split), on the batches the runs are evaluated on: a run no lower has learned no context."""
    shards = build_shards(cfg.corpus, cfg.tokenizer, vocab_size=cfg.vocab_size, progress=False)
    counts = np.ones(shards.vocab.size)
    for doc in shards.documents("train"):
        counts += np.bincount(shards.document_tokens(doc), minlength=shards.vocab.size)
    log_p = torch.from_numpy(np.log(counts / counts.sum()))
    total, count = 0.0, 0
    for batch in heldout_batches(shards, cfg.batch_size, cfg.max_seq_length, max_batches=cfg.eval_batches):
        labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
        total, count = total - log_p[labels].sum().item(), count + len(labels)
    return total / count


def from_scratch_at_sizes(cfg: PretrainConfig, sizes: dict) -> dict:
    """Pre-train a model with the given per-layer head and FFN sizes from its first step. BERT's initialisation does
    not depend on a matrix's shape, so cutting a fresh model is a fresh model of the smaller shape."""
    with claim_run_folder(cfg.out_dir, resume=False, overwrite=True):
        trainer = build_trainer(cfg)
        trainer.model = prune_to_sizes(trainer.model, sizes["heads_per_layer"], sizes["intermediate_size_per_layer"],
                                       optimizer=trainer.optimizer)
        return trainer.run()


def run(out: Path, scale: str = "small", progress: bool = False, corpus: str | None = None) -> dict:
    spec = SCALES[scale]
    steps, common = spec["steps"], dict(stages=None, corpus=corpus, progress=progress, overwrite=True, **spec["model"])
    out.mkdir(parents=True, exist_ok=True)
    folders = {FULL: out / "full", EARLYBIRD: out / "earlybird", EARLYBIRD_EQUAL_TIME: out / "earlybird-equal-time",
               PRUNED_SIZE: out / "pruned-size"}
    summaries = {FULL: pretrain(PretrainConfig(out_dir=str(folders[FULL]), steps=steps, **common)),
                 EARLYBIRD: pretrain(PretrainConfig(out_dir=str(folders[EARLYBIRD]), steps=steps, earlybird=True,
                                                    **common))}
    ticket = json.loads((folders[EARLYBIRD] / "ticket.json").read_text())
    equal_time_steps = round(steps * summaries[FULL]["train_time"] / summaries[EARLYBIRD]["train_time"])
    summaries[EARLYBIRD_EQUAL_TIME] = pretrain(PretrainConfig(out_dir=str(folders[EARLYBIRD_EQUAL_TIME]),
                                                              steps=equal_time_steps, earlybird=True, **common))
    summaries[PRUNED_SIZE] = from_scratch_at_sizes(PretrainConfig(out_dir=str(folders[PRUNED_SIZE]), steps=steps,
                                                                  **common), ticket)
    curves = {name: eval_log(folder)[0] for name, folder in folders.items()}
    result = {
        "scale": scale, "settings": {"steps": steps, **spec["model"]},
        "ticket": {k: ticket[k] for k in ("step", "drawn_by", "heads_per_layer", "intermediate_size_per_layer",
                                          "search_train_time")},
        "steps": {name: s["step"] for name, s in summaries.items()},
        "train_time_s": {name: s["train_time"] for name, s in summaries.items()},
        "heldout_loss": {name: curve[-1][1] for name, curve in curves.items()},
        "full_loss_at_earlybird_time": loss_at(curves[FULL], summaries[EARLYBIRD]["train_time"]),
        "unigram_loss": unigram_loss(PretrainConfig(steps=steps, **common)),
        "curves": curves,
    }
    result["time_saved"] = 1 - result["train_time_s"][EARLYBIRD] / result["train_time_s"][FULL]
    result["width_matters"] = result["heldout_loss"][FULL] < result["heldout_loss"][PRUNED_SIZE]
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result, out / "loss_vs_time.png")
    shutil.copy(folders[EARLYBIRD] / "mask_distance.png", out / "mask_distance.png")
    return result


def markdown(result: dict) -> str:
    ticket, time, loss = result["ticket"], result["train_time_s"], result["heldout_loss"]
    lines = ["| run | steps | training time | held-out MLM loss |", "|---|---|---|---|"]
    for name in (FULL, EARLYBIRD, EARLYBIRD_EQUAL_TIME, PRUNED_SIZE):
        search = f" ({ticket['search_train_time']:.0f} s search)" if name == EARLYBIRD else ""
        lines.append(f"| {name} | {result['steps'][name]} | {time[name]:.0f} s{search} | {loss[name]:.4f} |")
    lines += ["", f"EarlyBERT at the same steps: {100 * result['time_saved']:.0f}% less training time, held-out loss "
              f"{loss[EARLYBIRD]:.4f} against the full model's {loss[FULL]:.4f} at its end and "
              f"{result['full_loss_at_earlybird_time']:.4f} at the same training time (interpolated). "
              f"With the full run's time it reaches {loss[EARLYBIRD_EQUAL_TIME]:.4f}.",
              f"Width {'matters' if result['width_matters'] else 'does not matter'} at this size: the ticket's sizes "
              f"trained from scratch end at {loss[PRUNED_SIZE]:.4f}, the full model at {loss[FULL]:.4f}; word "
              f"frequencies alone give {result['unigram_loss']:.4f}.", *ticket_and_settings(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    with saved_figure(path, figsize=(7, 4.2)) as (fig, ax):
        for name, curve in result["curves"].items():
            times, losses = zip(*curve[1:])  # from the first evaluation after step 0 (the untrained loss is far above)
            ax.plot(times, losses, marker="o", markersize=2, label=f"{name} ({result['heldout_loss'][name]:.3f})")
        ax.axvline(result["ticket"]["search_train_time"], color="gray", linestyle=":",
                   label="earlybird: ticket drawn")
        ax.axhline(result["unigram_loss"], color="black", linewidth=1, linestyle="--",
                   label=f"word frequencies alone ({result['unigram_loss']:.3f})")
        ax.set(xlabel="training time (s, evaluation excluded)", ylabel="held-out MLM loss",
               title="EarlyBERT in pre-training against the full model")
        ax.legend(fontsize=8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="report/bench/earlybird-pretrain")
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    print(markdown(run(Path(args.out), args.scale, args.progress)))


if __name__ == "__main__":
    main()
