"""EarlyBERT's ticket search as a hook on the one training loop, shared by its two settings:

- fine-tuning (`bertforge earlybird`): the search ends at the draw; the ticket is cut from the rewound weights and
  fine-tuned afresh (the official code's setting);
- pre-training (`bertforge pretrain --earlybird true`): at the draw the model is pruned in place, its optimizer
  state cut with it, and training goes on from the searched weights without the L1 term (the paper's pre-training
  setting, whose code was never released).
"""

import dataclasses
import warnings

import torch

from bertforge.model.growth import unwrap
from bertforge.model.slimming import EarlyBird, coefficients, draw_ticket, l1_penalty
from bertforge.train.figures import saved_figure


@dataclasses.dataclass
class TicketSettings:
    """How a ticket is searched and drawn; a run's config extends this class, so every field is also a CLI flag."""

    head_ratio: float = 1 / 3  # fraction of each layer's heads pruned (ranked within the layer)
    ffn_ratio: float = 0.4  # fraction of all FFN neurons pruned (ranked over every layer together)
    head_l1: float = 1e-4
    ffn_l1: float = 1e-4
    rank_by: str = "raw"  # raw coefficient (the official code) or abs (|c|, as Early-Bird-Tickets ranks |gamma|)
    record_interval: int = 10  # optimizer steps between coefficient records; each record feeds the detector
    window: int = 5  # masks compared: the newest and the window - 1 before it
    threshold: float = 0.1  # normalised Hamming distance under which two tickets count as the same
    draw_step: int | None = None  # draw at this step (the official slimming_coef_step) instead of detecting

    def ticket_problems(self) -> list[str]:
        found = []
        for name in ("head_ratio", "ffn_ratio"):
            if not 0 <= getattr(self, name) < 1:
                found.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("head_l1", "ffn_l1"):
            if getattr(self, name) < 0:
                found.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rank_by not in ("raw", "abs"):
            found.append(f"rank_by must be raw or abs, got {self.rank_by!r}")
        for name, low in (("record_interval", 1), ("window", 2)):
            if getattr(self, name) < low:
                found.append(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.threshold < 1:
            found.append(f"threshold must be in (0, 1), got {self.threshold}")
        if self.draw_step is not None and self.draw_step < 1:
            found.append(f"draw_step must be >= 1 (a step of the search), got {self.draw_step}")
        return found


TICKET_FIELDS = frozenset(field.name for field in dataclasses.fields(TicketSettings))


class TicketSearch:
    """Hook of the search: the L1 term on the slimming coefficients until the draw, their records, the early-bird
    detector, and the draw (at the detector, at draw_step, or at last_step with a warning). `draw` ends the run;
    the pre-training hook prunes instead."""

    def __init__(self, settings: TicketSettings, last_step: int | None = None):
        self.settings, self.last_step = settings, last_step
        self.detector = EarlyBird(settings.window, settings.threshold)
        self.records = []  # {"step", "heads", "ffn" (per-layer coefficient tensors), "distances"}
        self.drawn_by = None

    def backward(self, trainer, batch, scale: float) -> torch.Tensor:
        loss, s = trainer.model(**batch).loss, self.settings
        searching = self.drawn_by is None  # the L1 term ends with the search
        total = loss + l1_penalty(unwrap(trainer.model), s.head_l1, s.ffn_l1) if searching else loss
        (total * scale).backward()
        return loss.detach() * scale

    def on_step_start(self, trainer):
        if self.drawn_by is not None or trainer.step == 0:
            return
        s, step, model = self.settings, trainer.step, unwrap(trainer.model)
        at_draw_step = step == s.draw_step
        if step % s.record_interval == 0 or at_draw_step:
            self.record(step, model, trainer.log)
        if at_draw_step:
            self.drawn_by = f"draw_step {step}"
        elif s.draw_step is None and self.detector.found:
            self.drawn_by = f"early bird: the last {s.window} tickets within {s.threshold} of the newest"
        elif step == self.last_step:
            self.end_search(step, model, trainer.log)
        if self.drawn_by is not None:
            self.draw(trainer)

    def end_search(self, step: int, model, log=None):
        """The search's last step came and the ticket never settled: draw it there, with a warning."""
        self.record(step, model, log)
        self.drawn_by = "end of the search (the ticket never settled)"
        warnings.warn(f"no early-bird ticket by step {step}, the end of the search: drawn there; raise --threshold or "
                      "the search's length, or give --draw_step", stacklevel=2)

    def draw(self, trainer):
        trainer.finish(f"ticket drawn at step {trainer.step} ({self.drawn_by})")

    def record(self, step: int, model, log=None):
        """The coefficients after `step`, and the distances of their ticket to the ones before."""
        if self.records and self.records[-1]["step"] == step:
            return
        heads, ffn = coefficients(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an emptied layer is reported when the ticket is drawn, not per record
            head_keep, ffn_keep = self._ticket(heads, ffn)
        distances = self.detector.update(head_keep, ffn_keep)
        self.records.append({"step": step, "heads": [h.cpu() for h in heads], "ffn": [f.cpu() for f in ffn],
                             "distances": distances})
        if log is not None:
            log(kind="ticket", max_distance=max(distances) if distances else None,
                heads_kept=int(sum(k.sum() for k in head_keep)), neurons_kept=int(sum(k.sum() for k in ffn_keep)))

    def _ticket(self, heads, ffn):
        s = self.settings
        return draw_ticket(heads, ffn, s.head_ratio, s.ffn_ratio, s.rank_by)

    def ticket(self, search_train_time: float) -> dict:
        """The ticket of the newest record: keep-masks, when and why it was drawn, and every record."""
        last = self.records[-1]
        head_keep, ffn_keep = self._ticket(last["heads"], last["ffn"])
        return {"step": last["step"], "drawn_by": self.drawn_by, "head_keep": head_keep, "ffn_keep": ffn_keep,
                "records": self.records, "search_train_time": search_train_time}

    def state_dict(self):
        return {"records": self.records, "detector": self.detector.state_dict(), "drawn_by": self.drawn_by}

    def load_state_dict(self, state):
        self.records, self.drawn_by = state["records"], state["drawn_by"]
        self.detector.load_state_dict(state["detector"])


def ticket_summary(ticket: dict) -> dict:
    return {"step": ticket["step"], "drawn_by": ticket["drawn_by"],
            "heads_per_layer": [int(k.sum()) for k in ticket["head_keep"]],
            "intermediate_size_per_layer": [int(k.sum()) for k in ticket["ffn_keep"]],
            "search_train_time": ticket["search_train_time"],
            "records": [{"step": r["step"], "distances": r["distances"]} for r in ticket["records"]]}


def plot_distances(ticket: dict, threshold: float, path):
    """The largest and smallest distance of each record's ticket to the ones before it in the window."""
    rows = [(r["step"], max(r["distances"]), min(r["distances"])) for r in ticket["records"] if r["distances"]]
    with saved_figure(path, figsize=(7, 4)) as (fig, ax):
        if rows:
            steps, largest, smallest = zip(*rows)
            ax.plot(steps, largest, marker="o", label="largest distance to the earlier tickets in the window")
            ax.plot(steps, smallest, marker=".", linestyle=":", label="smallest")
        ax.axhline(threshold, color="gray", linestyle="--", label=f"threshold {threshold}")
        ax.axvline(ticket["step"], color="tab:red", linewidth=1, label=f"drawn at step {ticket['step']}")
        ax.set(xlabel="search step", ylabel="normalised Hamming distance of the masks",
               title="EarlyBERT ticket: mask distance during the search")
        ax.legend(fontsize=8)
