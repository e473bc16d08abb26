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
from pathlib import Path

import torch

from bertforge.model import BertForSequenceClassification
from bertforge.model.growth import unwrap
from bertforge.model.slimming import prune

from . import corpus
from .finetune import TOKENIZER_FILES, FinetuneConfig, finetune
from .loop import CHECKPOINT_NAME, ConfigError
from .run_folder import RunFolderError
from .tickets import TicketSearch, TicketSettings, plot_distances, ticket_summary

AFTER_DRAW = ("rewind", "continue")


@dataclasses.dataclass
class EarlybirdConfig(FinetuneConfig, TicketSettings):
    """Fine-tuning's fields (for the retraining) plus the ticket's."""

    out_dir: str = "runs/earlybird"
    search_epochs: int = 1  # the longest search
    after_draw: str = "rewind"  # rewind to the weights before the search, or continue from the searched ones
    ticket_from: str | None = None  # another earlybird run folder: retrain its ticket (and rewind), no search
    random_ticket: bool = False  # baseline: the same number of heads and neurons per layer, chosen at random

    def problems(self) -> list[str]:
        found = super().problems() + self.ticket_problems()
        if self.after_draw not in AFTER_DRAW:
            found.append(f"after_draw must be one of {AFTER_DRAW}, got {self.after_draw!r}")
        if self.search_epochs < 1:
            found.append(f"search_epochs must be >= 1, got {self.search_epochs}")
        if self.random_ticket and self.ticket_from is None:
            found.append("random_ticket draws at the sizes of a searched ticket: give --ticket_from RUN_FOLDER")
        return found


class RewindableSearch(TicketSearch):
    """The fine-tuning search: it also keeps the weights before the first update, which the ticket rewinds to."""

    def __init__(self, cfg: EarlybirdConfig, rewind_dir: Path):
        super().__init__(cfg)
        self.rewind_dir = rewind_dir

    def on_step_start(self, trainer):
        if trainer.step == 0 and not self.rewind_dir.exists():
            unwrap(trainer.model).save_pretrained(self.rewind_dir)
        super().on_step_start(trainer)


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
    hook = RewindableSearch(cfg, folder / "rewind")
    summary = finetune(search_cfg, extra_hooks=[hook], slimming=True)
    model = unwrap(summary["model"])
    if hook.drawn_by is None and summary["step"] < search_cfg.steps:
        return None  # stopped by --stop_after: --resume true continues the search
    if hook.drawn_by is None:
        hook.end_search(summary["step"], model)
    model.save_pretrained(folder / "searched")
    ticket = hook.ticket(summary["train_time"])
    torch.save(ticket, out / "ticket.pt")
    (out / "ticket.json").write_text(json.dumps(ticket_summary(ticket), indent=1))
    plot_distances(ticket, cfg.threshold, out / "mask_distance.png")
    return ticket


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
