"""`bertforge earlybird`: EarlyBERT (Chen et al., ACL 2021) in fine-tuning, as one resumable command.

    bertforge earlybird                                   # MiniLM on Rotten Tomatoes: search, draw, prune, retrain
    bertforge earlybird --draw_step 50                    # the official fixed draw point, no detection
    bertforge earlybird --ticket_from runs/earlybird --random_ticket true --out_dir runs/earlybird-random

Phases, each in --out_dir, each skipped once done (--resume true continues the one a crash interrupted):
  search/        fine-tuning (final classifier) with slimming coefficients, a scale per attention head and per FFN
                 neuron starting at 1, and the loss plus head_l1 * sum |c_head| + ffn_l1 * sum |c_ffn|. Every
                 record_interval steps the coefficients give a ticket, compared with the tickets before it
                 (EarlyBird: all of the last window - 1 within threshold); the search ends when the ticket settles,
                 or at --draw_step, or at the end of search_epochs (drawn there, with a warning).
                 search/rewind/ is the model before its first update (the official code's checkpoint-0).
  ticket.pt      the keep-masks and every record; ticket.json the sizes and distances; mask_distance.png the curve.
  ticket-model/  the rewound model (--after_draw rewind, the official fine-tuning setting) or the searched one
                 (continue), pruned: a smaller dense BERT whose config.json records each layer's sizes.
  retrain/       `bertforge finetune` of the ticket model, any recipe, --epochs, a fresh optimizer and schedule, no
                 L1 term; the slimming scales stay as trainable per-unit scales, as in the official code.
earlybird.json: each phase's training time, the total, the ticket's sizes and the test accuracy.

One learning rate (--lr) serves the search and the retraining; the L1 term is added once per optimizer step.
--stop_after N stops the running phase after its step N, as a crash would (for tests of --resume).
"""

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from bertforge.model import BertForSequenceClassification
from bertforge.model.growth import unwrap
from bertforge.model.slimming import EarlyBird, coefficients, draw_ticket, l1_penalty, prune

from . import corpus
from .finetune import TOKENIZER_FILES, FinetuneConfig, finetune
from .loop import CHECKPOINT_NAME, ConfigError
from .run_folder import RunFolderError

AFTER_DRAW = ("rewind", "continue")


@dataclasses.dataclass
class EarlybirdConfig(FinetuneConfig):
    """Fine-tuning's fields (for the retraining) plus the ticket's."""

    out_dir: str = "runs/earlybird"
    head_ratio: float = 1 / 3  # fraction of each layer's heads pruned (ranked within the layer)
    ffn_ratio: float = 0.4  # fraction of all FFN neurons pruned (ranked over every layer together)
    head_l1: float = 1e-4
    ffn_l1: float = 1e-4
    rank_by: str = "raw"  # raw coefficient (the official code) or abs (|c|, as Early-Bird-Tickets ranks |gamma|)
    record_interval: int = 10  # optimizer steps between coefficient records; each record feeds the detector
    window: int = 5  # masks compared: the newest and the window - 1 before it
    threshold: float = 0.1  # normalised Hamming distance under which two tickets count as the same
    draw_step: int | None = None  # draw at this step (the official slimming_coef_step) instead of detecting
    search_epochs: int = 1  # the longest search
    after_draw: str = "rewind"  # rewind to the weights before the search, or continue from the searched ones
    ticket_from: str | None = None  # another earlybird run folder: retrain its ticket (and rewind), no search
    random_ticket: bool = False  # baseline: the same number of heads and neurons per layer, chosen at random

    def problems(self) -> list[str]:
        found = super().problems()
        for name in ("head_ratio", "ffn_ratio"):
            if not 0 <= getattr(self, name) < 1:
                found.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("head_l1", "ffn_l1"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rank_by not in ("raw", "abs"):
            found.append(f"rank_by must be raw or abs, got {self.rank_by!r}")
        if self.after_draw not in AFTER_DRAW:
            found.append(f"after_draw must be one of {AFTER_DRAW}, got {self.after_draw!r}")
        for name, low in (("record_interval", 1), ("window", 2), ("search_epochs", 1)):
            if getattr(self, name) < low:
                found.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.threshold < 1:
            found.append(f"threshold must be in (0, 1), got {self.threshold}")
        if self.draw_step is not None and self.draw_step < 1:
            found.append(f"draw_step must be >= 1 (a step of the search), got {self.draw_step}")
        if self.random_ticket and self.ticket_from is None:
            found.append("random_ticket draws at the sizes of a searched ticket: give --ticket_from RUN_FOLDER")
        return found


class TicketSearch:
    """Hook of the search: the L1 term on the slimming coefficients, their records, the early-bird detector, and
    the end of the run once the ticket is drawn."""

    def __init__(self, cfg: EarlybirdConfig, rewind_dir: Path):
        self.cfg, self.rewind_dir = cfg, rewind_dir
        self.detector = EarlyBird(cfg.window, cfg.threshold)
        self.records = []  # {"step", "heads", "ffn" (per-layer coefficient tensors), "distances"}
        self.drawn_by = None

    def backward(self, trainer, batch, scale: float) -> torch.Tensor:
        model = unwrap(trainer.model)
        loss = trainer.model(**batch).loss
        ((loss + l1_penalty(model, self.cfg.head_l1, self.cfg.ffn_l1)) * scale).backward()
        return loss.detach() * scale

    def on_step_start(self, trainer):
        if trainer.step == 0:
            if not self.rewind_dir.exists():  # the weights the ticket rewinds to, before any update
                unwrap(trainer.model).save_pretrained(self.rewind_dir)
            return
        at_draw_step = trainer.step == self.cfg.draw_step
        if trainer.step % self.cfg.record_interval == 0 or at_draw_step:
            self.record(trainer.step, unwrap(trainer.model), trainer.log)
        if at_draw_step:
            self.drawn_by = f"draw_step {trainer.step}"
        elif self.cfg.draw_step is None and self.detector.found:
            self.drawn_by = (f"early bird: the last {self.cfg.window} tickets within {self.cfg.threshold} of the "
                             "newest")
        if self.drawn_by:
            trainer.finish(f"ticket drawn at step {trainer.step} ({self.drawn_by})")

    def record(self, step: int, model, log=None):
        """The coefficients after `step`, and the distances of their ticket to the ones before."""
        if self.records and self.records[-1]["step"] == step:
            return
        heads, ffn = coefficients(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an emptied layer is reported when the ticket is drawn, not per record
            head_keep, ffn_keep = draw_ticket(heads, ffn, self.cfg.head_ratio, self.cfg.ffn_ratio, self.cfg.rank_by)
        distances = self.detector.update(head_keep, ffn_keep)
        self.records.append({"step": step, "heads": [h.cpu() for h in heads], "ffn": [f.cpu() for f in ffn],
                             "distances": distances})
        if log is not None:
            log(kind="ticket", max_distance=max(distances) if distances else None,
                heads_kept=int(sum(k.sum() for k in head_keep)), neurons_kept=int(sum(k.sum() for k in ffn_keep)))

    def state_dict(self):
        return {"records": self.records, "detector": self.detector.state_dict(), "drawn_by": self.drawn_by}

    def load_state_dict(self, state):
        self.records, self.drawn_by = state["records"], state["drawn_by"]
        self.detector.load_state_dict(state["detector"])


def _finetune_fields(cfg: EarlybirdConfig) -> dict:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}


def _copy_tokenizer(source: Path, folder: Path):
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, folder / name)


def search(cfg: EarlybirdConfig, out: Path) -> dict:
    """Run (or continue) the search; write ticket.pt, ticket.json and mask_distance.png."""
    folder = out / "search"
    resume = cfg.resume and (folder / CHECKPOINT_NAME).exists()
    search_cfg = FinetuneConfig(**{**_finetune_fields(cfg), "recipe": "final", "exit_pooling": "cls",
                                   "epochs": cfg.search_epochs, "out_dir": str(folder), "resume": resume,
                                   "overwrite": not resume, "eval_interval": 0})
    hook = TicketSearch(cfg, folder / "rewind")
    summary = finetune(search_cfg, extra_hooks=[hook], slimming=True)
    model = unwrap(summary["model"])
    if hook.drawn_by is None and summary["step"] < search_cfg.steps:
        return None  # stopped by --stop_after: --resume true continues the search
    if hook.drawn_by is None:  # the search ran to its end: draw there
        hook.record(summary["step"], model)
        hook.drawn_by = "end of the search (the ticket never settled)"
        warnings.warn(f"no early-bird ticket within {cfg.search_epochs} epoch(s) of search: drawn at its last step "
                      f"{summary['step']}; raise --threshold or --search_epochs, or give --draw_step", stacklevel=2)
    model.save_pretrained(folder / "searched")
    last = hook.records[-1]
    head_keep, ffn_keep = draw_ticket(last["heads"], last["ffn"], cfg.head_ratio, cfg.ffn_ratio, cfg.rank_by)
    ticket = {"step": last["step"], "drawn_by": hook.drawn_by, "head_keep": head_keep, "ffn_keep": ffn_keep,
              "records": hook.records, "search_train_time": summary["train_time"]}
    torch.save(ticket, out / "ticket.pt")
    (out / "ticket.json").write_text(json.dumps(ticket_summary(ticket), indent=1))
    plot_distances(ticket, cfg, out / "mask_distance.png")
    return ticket


def ticket_summary(ticket: dict) -> dict:
    return {"step": ticket["step"], "drawn_by": ticket["drawn_by"],
            "heads_per_layer": [int(k.sum()) for k in ticket["head_keep"]],
            "intermediate_size_per_layer": [int(k.sum()) for k in ticket["ffn_keep"]],
            "search_train_time": ticket["search_train_time"],
            "records": [{"step": r["step"], "distances": r["distances"]} for r in ticket["records"]]}


def random_ticket_like(ticket: dict, seed: int) -> tuple[list, list]:
    """Keep-masks with the ticket's number of heads and neurons in every layer, the units chosen at random."""
    generator = torch.Generator().manual_seed(seed)

    def shuffled(keep):
        out = torch.zeros_like(keep)
        out[torch.randperm(keep.numel(), generator=generator)[:int(keep.sum())]] = True
        return out

    return [shuffled(k) for k in ticket["head_keep"]], [shuffled(k) for k in ticket["ffn_keep"]]


def ticket_model(cfg: EarlybirdConfig, source_run: Path, ticket: dict, folder: Path):
    """The rewound (or searched) model, pruned to the ticket, as a fine-tuning checkpoint folder."""
    source = source_run / "search" / ("rewind" if cfg.after_draw == "rewind" else "searched")
    head_keep, ffn_keep = (random_ticket_like(ticket, cfg.seed) if cfg.random_ticket
                           else (ticket["head_keep"], ticket["ffn_keep"]))
    model = prune(BertForSequenceClassification.from_pretrained(source), head_keep, ffn_keep)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    _copy_tokenizer(Path(cfg.checkpoint) if cfg.checkpoint else corpus.minilm_checkpoint(), staging)
    staging.rename(folder)


def earlybird(cfg: EarlybirdConfig) -> dict:
    """Search, draw, prune and retrain (each phase skipped when already done); returns the run's summary."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bertforge earlybird runs in one process (its phases write shared files); run it without "
                          "torchrun")
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume:
            raise RunFolderError(f"{out} already holds a run: continue it with --resume true, replace it with "
                                 "--overwrite true, or give another --out_dir")
    out.mkdir(parents=True, exist_ok=True)
    source_run = Path(cfg.ticket_from) if cfg.ticket_from else out
    if cfg.ticket_from:
        if not (source_run / "ticket.pt").exists():
            raise FileNotFoundError(f"--ticket_from {source_run}: no ticket.pt there (an earlybird run folder has one)")
        ticket = torch.load(source_run / "ticket.pt", weights_only=False)
    elif (out / "ticket.pt").exists():
        ticket = torch.load(out / "ticket.pt", weights_only=False)
    else:
        ticket = search(cfg, out)
        if ticket is None:
            return {"phase": "search", "stopped": True}
    if not (out / "ticket-model").exists():
        ticket_model(cfg, source_run, ticket, out / "ticket-model")
    retrain_dir = out / "retrain"
    resume = cfg.resume and (retrain_dir / CHECKPOINT_NAME).exists()
    retrain = finetune(FinetuneConfig(**{**_finetune_fields(cfg), "checkpoint": str(out / "ticket-model"),
                                         "out_dir": str(retrain_dir), "resume": resume, "overwrite": not resume}))
    search_time = 0.0 if cfg.ticket_from else ticket["search_train_time"]
    summary = {**ticket_summary(ticket), "random_ticket": cfg.random_ticket, "after_draw": cfg.after_draw,
               "retrain_train_time": retrain["train_time"], "search_train_time": search_time,
               "total_train_time": search_time + retrain["train_time"],
               "test_accuracy": retrain.get("test_accuracy"), "retrain_steps": retrain["step"]}
    summary.pop("records")
    (out / "earlybird.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot_distances(ticket: dict, cfg: EarlybirdConfig, path: Path):
    """The largest and smallest distance of each record's ticket to the ones before it in the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r["step"], max(r["distances"]), min(r["distances"])) for r in ticket["records"] if r["distances"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if rows:
        steps, largest, smallest = zip(*rows)
        ax.plot(steps, largest, marker="o", label="largest distance to the earlier tickets in the window")
        ax.plot(steps, smallest, marker=".", linestyle=":", label="smallest")
    ax.axhline(cfg.threshold, color="gray", linestyle="--", label=f"threshold {cfg.threshold}")
    ax.axvline(ticket["step"], color="tab:red", linewidth=1, label=f"drawn at step {ticket['step']}")
    ax.set(xlabel="search step", ylabel="normalised Hamming distance of the masks",
           title="EarlyBERT ticket: mask distance during the search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
