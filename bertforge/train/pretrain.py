"""Masked-LM pre-training, optionally with progressive stacking or an EarlyBERT ticket: the parts the loop runs with.

Stage plan "2:300,4:300,8:600" (depth:steps): start at depth 2, stack to 4 after 300 steps, to 8 after 600
more; 1,200 steps in all. Stacking happens in place (bertforge.model.growth.stack) with the optimizer state of
the copies cloned from their sources ("copy", the default) or left empty ("reset", the paper's choice).

Learning rate: one linear warmup then linear decay to zero over the whole plan; stage boundaries do not touch
it, so each stage starts at the rate where the previous one ended, without re-warming, as in the official code,
and the schedule ends at zero within the run's own budget (the fair baseline protocol of design.md). The
official code instead used a separate piecewise-linear schedule per stage; this single schedule is our choice.

EarlyBERT (--earlybird true): the model trains with slimming coefficients and their L1 term until the ticket
settles (train/tickets.py), is pruned to it in place with its optimizer state, and trains on at the same
learning-rate schedule, the L1 term dropped.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from bertforge.model import BertConfig, BertForMaskedLM
from bertforge.model.growth import OPTIMIZER_STATE_MODES, depth, stack
from bertforge.model.slimming import prune, prune_to_sizes

from . import distributed
from .checkpoint import CheckpointError
from .loop import ConfigError, LoopSettings, Trainer, linear_warmup_decay
from .mlm import MLMBatches, heldout_batches
from .run_folder import claim_run_folder
from .shards import build_shards
from .tickets import TICKET_FIELDS, TicketSearch, TicketSettings, plot_distances, ticket_summary
from .tokenizer import MIN_TRAINED_VOCAB


@dataclasses.dataclass
class PretrainConfig(LoopSettings, TicketSettings):
    """Every knob of a pre-training run; the CLI exposes each field as --name value."""

    # model at its final depth (a stage plan starts shallower); num_layers None = the plan's last depth, or 4
    hidden_size: int = 128
    num_layers: int | None = None
    num_heads: int = 2
    intermediate_size: int = 512
    dropout: float = 0.1
    # data: corpus None = the packaged news corpus; tokenizer None = bert-base-uncased WordPiece (MiniLM's vocab),
    # or, with vocab_size, a WordPiece vocabulary of that size learned from the corpus
    corpus: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    max_seq_length: int = 128
    batch_size: int = 32
    # schedule: steps (a LoopSettings field) None = the plan's total, or 300 without a plan
    stages: str | None = "2:100,4:200"  # depth:steps,... ; None = train num_layers from scratch
    optimizer_state: str = "copy"  # state of the copied layers at a stacking step: copy or reset
    # EarlyBERT: search a ticket (TicketSettings' fields), prune to it in place and train on
    earlybird: bool = False
    max_search_steps: int | None = None  # draw here at the latest; None = half of the steps
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    seed: int = 0
    # bookkeeping beyond the loop's (not part of the run's identity)
    out_dir: str = "runs/pretrain"
    eval_interval: int = 50
    eval_batches: int = 16
    checkpoint_interval: int = 100

    BOOKKEEPING = LoopSettings.BOOKKEEPING + ("eval_batches",)

    def __post_init__(self):
        found = self.problems()
        if found:
            raise ConfigError("\n".join(found))

    def problems(self) -> list[str]:
        found = []
        if self.stages is not None:
            try:
                plan = parse_stages(self.stages)
            except ValueError as error:
                return [str(error)]
            for name, from_plan in (("num_layers", plan[-1][0]), ("steps", sum(steps for _, steps in plan))):
                if getattr(self, name) is None:
                    setattr(self, name, from_plan)
                elif getattr(self, name) != from_plan:
                    found.append(f"{name} = {getattr(self, name)} contradicts the stage plan {self.stages!r} "
                                 f"({name} {from_plan}); give one of them (--stages none trains num_layers alone)")
        else:
            self.num_layers = 4 if self.num_layers is None else self.num_layers
            self.steps = 300 if self.steps is None else self.steps
        found += super().problems()
        if self.optimizer_state not in OPTIMIZER_STATE_MODES:
            found.append(f"optimizer_state must be one of {OPTIMIZER_STATE_MODES}, got {self.optimizer_state!r}")
        for name in ("batch_size", "eval_batches"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_length < 5:
            found.append(f"max_seq_length must be >= 5 ([CLS] A [SEP] B [SEP]), got {self.max_seq_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            found.append(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            found.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.weight_decay >= 0:
            found.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                found.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            found.append(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.vocab_size is not None and self.tokenizer is not None:
            found.append("give either tokenizer or vocab_size (a vocabulary to learn), not both")
        if self.vocab_size is not None and self.vocab_size < MIN_TRAINED_VOCAB:
            found.append(f"vocab_size must be >= {MIN_TRAINED_VOCAB} to learn word pieces, got {self.vocab_size}")
        if self.seed < 0:
            found.append(f"seed must be >= 0, got {self.seed}")
        if self.earlybird:
            found += self.ticket_problems()
            if self.stages is not None and len(parse_stages(self.stages)) > 1:
                found.append("earlybird searches a ticket at one depth: give --stages none (a stacked model is "
                             "searched when it is fine-tuned: bertforge earlybird --checkpoint FOLDER)")
            for name in ("draw_step", "max_search_steps"):
                value = getattr(self, name)
                if value is not None and not 1 <= value < self.steps:
                    found.append(f"{name} must be a step before the last ({self.steps}), got {value}")
        try:  # the model's own checks (heads dividing the width, head_dim for the kernel, dropout), before any work
            model_config(self, self.vocab_size or MIN_TRAINED_VOCAB, self.num_layers)
        except ValueError as error:
            found.append(str(error))
        return found

    def identity(self) -> dict:
        """The ticket's fields define only an EarlyBERT run (a plain run resumes whatever they say)."""
        found = super().identity()
        ticket_only = TICKET_FIELDS | {"earlybird", "max_search_steps"}
        return found if self.earlybird else {k: v for k, v in found.items() if k not in ticket_only}

    def last_search_step(self) -> int:
        return self.max_search_steps if self.max_search_steps is not None else max(1, self.steps // 2)

    def plan(self) -> list[tuple[int, int]]:
        return parse_stages(self.stages) if self.stages is not None else [(self.num_layers, self.steps)]


def parse_stages(spec: str) -> list[tuple[int, int]]:
    """"3:50000,6:70000,12:280000" -> [(3, 50000), (6, 70000), (12, 280000)]; each depth doubles the last."""
    plan = []
    for part in spec.split(","):
        try:
            layers, steps = (int(x) for x in part.strip().split(":"))
        except ValueError:
            raise ValueError(f"stage {part!r} of {spec!r} is not depth:steps (e.g. 3:50000,6:70000)") from None
        if layers < 1 or steps < 1:
            raise ValueError(f"stage {part!r}: depth and steps must be >= 1")
        if plan and layers != 2 * plan[-1][0]:
            raise ValueError(f"stage plan {spec!r}: depth {layers} after {plan[-1][0]} does not double "
                             f"(stacking copies the whole stack, so each stage has twice the layers)")
        plan.append((layers, steps))
    return plan


class Stacking:
    """Hook: at each stage boundary, stack the model in place (and re-wrap DDP); on resume, replay the growth."""

    def __init__(self, plan, optimizer_state="copy"):
        self.boundaries = {}  # step -> depth after stacking there
        step = 0
        for (layers, steps), (next_layers, _) in zip(plan, plan[1:]):
            step += steps
            self.boundaries[step] = next_layers
        self.optimizer_state = optimizer_state

    def on_step_start(self, trainer):
        target = self.boundaries.get(trainer.step)
        if target is not None and depth(trainer.model) < target:
            trainer.model = stack(trainer.model, trainer.optimizer, self.optimizer_state)
            trainer.log(kind="stack", depth=depth(trainer.model))

    def restore(self, trainer, checkpoint):
        while depth(trainer.model) < checkpoint["model_config"]["num_hidden_layers"]:
            trainer.model = stack(trainer.model, trainer.optimizer, self.optimizer_state)


class PruneAtDraw(TicketSearch):
    """EarlyBERT in pre-training: at the draw the model is pruned in place, its optimizer state cut with it, and
    training goes on from the searched weights; ticket.json and mask_distance.png go to the run folder."""

    def draw(self, trainer):
        ticket = self.ticket(trainer.train_time)
        trainer.model = prune(trainer.model, ticket["head_keep"], ticket["ffn_keep"], optimizer=trainer.optimizer)
        summary = ticket_summary(ticket)
        trainer.log(kind="prune", drawn_by=self.drawn_by, heads_per_layer=summary["heads_per_layer"],
                    intermediate_size_per_layer=summary["intermediate_size_per_layer"])
        if trainer.rank == 0:
            (trainer.out_dir / "ticket.json").write_text(json.dumps(summary, indent=1))
            plot_distances(ticket, self.settings.threshold, trainer.out_dir / "mask_distance.png")

    def restore(self, trainer, checkpoint):
        """A run pruned before its checkpoint: cut the new model to the saved sizes (the saved weights load next)."""
        saved = checkpoint["model_config"]
        if saved.get("heads_per_layer") is None:
            return
        trainer.model = prune_to_sizes(trainer.model, saved["heads_per_layer"], saved["intermediate_size_per_layer"],
                                       optimizer=trainer.optimizer)


def model_config(cfg: PretrainConfig, vocab_size: int, layers: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                      max_position_embeddings=max(512, cfg.max_seq_length), slimming=cfg.earlybird)


def build_optimizer(model, cfg: PretrainConfig, device, head_lr: float | None = None,
                    is_head=lambda name: False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorm or embeddings' norm), fused on GPU; with
    head_lr, the parameters is_head(name) picks learn at that rate instead of cfg.lr."""
    groups = {(decay, head): [] for head in (False, True) for decay in (True, False)}
    for name, p in model.named_parameters():
        groups[p.dim() >= 2, head_lr is not None and is_head(name)].append(p)
    settings = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                 **({"lr": head_lr} if head else {})} for (decay, head), params in groups.items() if params or not head]
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(settings, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **fast)


def heldout_loss(shards, cfg: PretrainConfig, device):
    """Evaluation function: mean MLM loss over the masked tokens of the fixed held-out batches."""
    batches = list(heldout_batches(shards, batch_size=cfg.batch_size, max_seq_length=cfg.max_seq_length,
                                        max_batches=cfg.eval_batches))

    def evaluate(model):
        total, count = torch.zeros((), device=device), 0
        for batch in batches:
            n = len(batch["label_positions"])  # counted on the CPU: no device read per batch
            total += model(**{k: v.to(device) for k, v in batch.items()}).loss.float() * n
            count += n
        return {"heldout_loss": total.item() / max(count, 1)}

    return evaluate


def vocabulary_fingerprint(shards) -> str:
    """Hash of the token -> id map: a resume must see the same ids, even if a tokenizer file changed in place or a
    vocabulary was learned again (the checkpoint's run config keeps it)."""
    return hashlib.sha256(json.dumps(sorted(shards.tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def save_vocabulary(run_config: dict, folder) -> None:
    """Write the run's tokenizer.json into `folder`, beside its weights, so the folder fine-tunes as it is. The
    vocabulary comes from the run's (cached) shards; a different token -> id map than the run's is refused."""
    shards = build_shards(run_config["corpus"], run_config["tokenizer"], vocab_size=run_config["vocab_size"],
                          progress=False)
    expected = run_config.get("vocabulary")
    if expected is not None and vocabulary_fingerprint(shards) != expected:
        raise CheckpointError("the run's vocabulary is not the one its tokenizer gives today (a tokenizer file or "
                              "the corpus changed since); write tokenizer.json beside the weights yourself")
    shutil.copy(shards.folder / "tokenizer.json", Path(folder) / "tokenizer.json")


def build_trainer(cfg: PretrainConfig) -> Trainer:
    device = distributed.setup_distributed(cfg.dist_timeout)
    rank, world_size = distributed.rank(), distributed.world_size()
    torch.manual_seed(cfg.seed)
    if rank == 0:
        shards = build_shards(cfg.corpus, cfg.tokenizer, vocab_size=cfg.vocab_size, progress=cfg.progress)
    if world_size > 1:
        torch.distributed.barrier()
    if rank != 0:
        shards = build_shards(cfg.corpus, cfg.tokenizer, vocab_size=cfg.vocab_size, progress=False)
    batches = MLMBatches(shards, cfg.batch_size, cfg.max_seq_length, seed=cfg.seed, rank=rank,
                              world_size=world_size)
    plan = cfg.plan()
    model = BertForMaskedLM(model_config(cfg, shards.vocab.size, plan[0][0])).to(device)
    if world_size > 1:  # every rank starts from rank 0's weights
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(cfg.warmup_steps, cfg.steps))
    hooks = [Stacking(plan, cfg.optimizer_state)] if len(plan) > 1 else []
    if cfg.earlybird:
        hooks.append(PruneAtDraw(cfg, last_step=cfg.last_search_step()))
    trainer = Trainer(model, optimizer, scheduler, batches, heldout_loss(shards, cfg, device), cfg,
                      hooks=hooks, run_config={**cfg.identity(), "vocabulary": vocabulary_fingerprint(shards)},
                      device=device)
    return trainer


def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or, with cfg.resume, continue) a pre-training run; returns the final step and training time."""
    with claim_run_folder(cfg.out_dir, cfg.resume, cfg.overwrite) if distributed.is_main_process() \
            else contextlib.nullcontext():
        trainer = build_trainer(cfg)
        if cfg.resume:
            trainer.resume()
        started = time.time()
        summary = trainer.run()
    summary["wall_time"] = time.time() - started
    summary["model"] = trainer.model
    return summary
