"""The one training loop every method runs on: data -> step -> log -> eval -> checkpoint.

    step: forward (bf16 autocast on GPU) -> loss / grad_accum -> backward -> clip -> check -> optimizer -> schedule

A method is a hook: an object with any of these methods, called by the loop.
    on_step_start(trainer)          before each optimizer step (e.g. grow the model at a stage boundary); it may
                                    call trainer.finish(reason) to end the run there, checkpointed (a ticket drawn)
    backward(trainer, batch, scale) forward and backward of one micro-batch (loss scaled by `scale`), returning the
                                    detached loss; replaces the default `model(**batch).loss` (a method's own loss)
    on_evaluate(trainer, metrics)   after each evaluation (e.g. keep the best model)
    restore(trainer, checkpoint)    on resume, before the states load: rebuild the checkpoint's model shape
    state_dict() / load_state_dict  extra state to checkpoint
A hook that changes the model assigns `trainer.model` (stacking re-wraps a DDP model).

Host syncs: the GPU never waits for Python except once per optimizer step, where the loop reads one small tensor
holding the gradient norm's finiteness, the loss and (under DDP) whether any rank was asked to stop. A step whose
loss or gradient norm is not finite is skipped (no parameter or optimizer-state update), logged and counted; too
many in a row stop the run, and the last checkpoint, which never holds a skipped step's gradients, stays.

SIGINT and SIGTERM finish the current optimizer step, save a checkpoint whose data position and RNG match the step
counter, then end the run (KeyboardInterrupt for SIGINT, exit status 143 for SIGTERM). A second SIGINT aborts at once.
"""

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bertforge.model.growth import depth, unwrap

from . import distributed
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state

CHECKPOINT_NAME = "checkpoint.pt"


class ConfigError(ValueError):
    """A configuration that would make training wrong; the message has one line per problem."""


@dataclasses.dataclass
class LoopSettings:
    """The loop's knobs; a recipe's config extends this class, so every field is also a CLI flag."""

    steps: int | None = None  # optimizer steps in all
    grad_accum: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0 = no clipping (the norm is still computed and checked)
    max_skipped_in_a_row: int = 10  # consecutive steps with a non-finite loss or gradient before the run stops
    out_dir: str = "runs/run"
    resume: bool = False
    overwrite: bool = False  # replace the run already in out_dir (without it, such a folder is refused)
    log_interval: int = 10
    eval_interval: int = 100  # 0 = no evaluation
    checkpoint_interval: int = 500
    stop_after: int | None = None  # stop (with a checkpoint) once this many steps are done: a planned interruption
    dist_timeout: float = 600.0  # seconds a collective may wait for another rank before the job fails
    progress: bool = True

    # not part of a run's identity: may change when it is resumed
    BOOKKEEPING = ("out_dir", "resume", "overwrite", "log_interval", "eval_interval", "checkpoint_interval",
                   "stop_after", "dist_timeout", "progress", "max_skipped_in_a_row")

    def problems(self) -> list[str]:
        """What is wrong with the values, one line each (empty when they are usable)."""
        found = []
        for name in ("grad_accum", "log_interval", "checkpoint_interval", "max_skipped_in_a_row"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            found.append(f"steps must be >= 1, got {self.steps}")
        if self.eval_interval < 0:
            found.append(f"eval_interval must be >= 0 (0 = no evaluation), got {self.eval_interval}")
        if self.stop_after is not None and self.stop_after < 1:
            found.append(f"stop_after must be >= 1 (or none), got {self.stop_after}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            found.append(f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        if not self.dist_timeout > 0:
            found.append(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.resume and self.overwrite:
            found.append("resume and overwrite exclude each other: continue the run in out_dir, or replace it")
        return found

    def identity(self) -> dict:
        """The fields that define the run: a checkpoint resumes only a run with the same ones."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.BOOKKEEPING}


class _StopSignals:
    """While active, SIGINT and SIGTERM only record a request to stop; the loop acts on it after the step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the step to finish
        self.received = signum

    def __enter__(self):
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Trainer:
    """Holds the run's parts and runs the loop; `run_config` identifies the run so a resume can be checked."""

    def __init__(self, model, optimizer, scheduler, batches, evaluate, settings: LoopSettings, *,
                 hooks=(), run_config: dict | None = None, device=torch.device("cpu")):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.batches, self.evaluate, self.settings = batches, evaluate, settings
        self.hooks, self.run_config, self.device = list(hooks), run_config or {}, device
        self.step = 0
        self.train_time = 0.0  # seconds spent in training steps, excluding evaluation and checkpoints
        self.skipped_steps = 0  # steps not applied because their loss or gradient norm was not finite
        self._skipped_in_a_row = 0
        self._saved_step = None
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.out_dir = Path(settings.out_dir)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self._signals = _StopSignals()
        self.finished = None  # a hook's reason to end the run before its last step
        self._log_file = None
        self._tensorboard = None

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        s = self.settings
        last = min(s.steps, s.stop_after) if s.stop_after is not None else s.steps
        bar = tqdm(total=s.steps, initial=self.step, disable=not s.progress or self.rank != 0, desc="train",
                   dynamic_ncols=True)
        try:
            with self._signals:
                if self.step == 0 and s.eval_interval:
                    self._evaluate()
                while self.step < last:
                    for hook in self.hooks:
                        if hasattr(hook, "on_step_start"):
                            hook.on_step_start(self)
                    if self.finished:
                        self.log(kind="finish", reason=self.finished)
                        self.save()
                        break
                    started = time.perf_counter()
                    with distributed.timeouts_explained(s.dist_timeout, f"step {self.step + 1}"):
                        loss, tokens, applied, stop = self._optimizer_step()
                    self.train_time += time.perf_counter() - started
                    self.step += 1
                    bar.update(1)
                    if not applied:
                        self._skipped(loss)
                    if self.step % s.log_interval == 0 or self.step == last:
                        self.log(kind="train", loss=loss, lr=self.scheduler.get_last_lr()[0],
                                 skipped_steps=self.skipped_steps,
                                 tokens_per_s=tokens / max(time.perf_counter() - started, 1e-9))
                        bar.set_postfix(loss=f"{loss:.3f}", depth=self.depth_hint())
                    if s.eval_interval and (self.step % s.eval_interval == 0 or self.step == s.steps):
                        self._evaluate()
                    if self.step % s.checkpoint_interval == 0 or self.step == last or stop:
                        self.save()
                    if stop:
                        self._stop(stop)
        finally:
            bar.close()
            self.close()
        return {"step": self.step, "train_time": self.train_time, "skipped_steps": self.skipped_steps}

    def finish(self, reason: str):
        """End the run before its next step (called by a hook's on_step_start)."""
        self.finished = reason

    def _optimizer_step(self):
        """One optimizer step over grad_accum micro-batches; returns (loss, tokens, applied, stop signal or 0)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, tokens = torch.zeros((), device=self.device), 0
        accum = self.settings.grad_accum
        for micro in range(accum):
            cpu_batch = next(self.batches)
            tokens += count_tokens(cpu_batch)
            batch = {k: self._to_device(v) for k, v in cpu_batch.items()}
            sync = micro == accum - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast:
                total_loss += self._backward(batch, 1.0 / accum).float()
        max_norm = self.settings.grad_clip or math.inf  # inf: only measure the norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # The step's one host sync: [not finite, SIGINT, SIGTERM, loss], summed over ranks so that all agree.
        # torch.full writes a Python number into device memory without a copy from the host (no wait).
        received = self._signals.received
        status = torch.stack([(~torch.isfinite(grad_norm) | ~torch.isfinite(total_loss)).float(),
                              torch.full((), float(received == signal.SIGINT), device=self.device),
                              torch.full((), float(received == signal.SIGTERM), device=self.device),
                              total_loss])
        if self.world_size > 1:
            dist.all_reduce(status)
        nonfinite, sigint, sigterm, loss = status.tolist()
        applied = nonfinite == 0 and math.isfinite(loss)
        if applied:
            self.optimizer.step()
            self._skipped_in_a_row = 0
        self.scheduler.step()  # a skipped step still advances the schedule, which is indexed by the step counter
        stop = signal.SIGTERM if sigterm else signal.SIGINT if sigint else 0
        return loss / self.world_size, tokens * self.world_size, applied, stop

    def _backward(self, batch, scale: float) -> torch.Tensor:
        for hook in self.hooks:
            if hasattr(hook, "backward"):
                return hook.backward(self, batch, scale)
        loss = self.model(**batch).loss * scale
        loss.backward()
        return loss.detach()

    def _to_device(self, value):
        """Copy a batch value (a tensor, or an object with pin_memory() and to()) without waiting for the copy."""
        if self.device.type == "cuda":
            return value.pin_memory().to(self.device, non_blocking=True)
        return value.to(self.device)

    def _skipped(self, loss):
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.log(kind="skip", reason="non-finite loss or gradient norm", loss=loss,
                 skipped_steps=self.skipped_steps)
        if self._skipped_in_a_row > self.settings.max_skipped_in_a_row:
            first = self.step - self._skipped_in_a_row + 1
            kept = (f"the last checkpoint, {self.checkpoint_path()} at step {self._saved_step}, holds only finite "
                    "updates" if self._saved_step is not None else "no checkpoint was written")
            raise FloatingPointError(f"steps {first} to {self.step}: loss or gradient norm not finite "
                                     f"{self._skipped_in_a_row} times in a row; stopped without applying them; {kept}")

    def _stop(self, signum: int):
        name = signal.Signals(signum).name
        self.log(kind="stop", signal=name)
        if self.rank == 0:
            print(f"\n{name} received: stopped after step {self.step}; checkpoint saved to {self.checkpoint_path()}; "
                  "continue with --resume true", file=sys.stderr)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _evaluate(self):
        if self.rank != 0 or self.evaluate is None:
            return
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = self.evaluate(self.model)
        self.log(kind="eval", **metrics)
        for hook in self.hooks:
            if hasattr(hook, "on_evaluate"):
                hook.on_evaluate(self, metrics)

    def depth_hint(self):
        try:
            return depth(self.model)
        except TypeError:
            return None

    # -- logging ---------------------------------------------------------------------------------------------

    def log(self, kind: str, **values):
        """One JSONL record (and TensorBoard scalars) with step, wall-clock and training time, on rank 0."""
        if self.rank != 0:
            return
        if self._log_file is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.out_dir / "log.jsonl", "a", encoding="utf-8")
            self._tensorboard = _tensorboard_writer(self.out_dir / "tensorboard")
        record = {"kind": kind, "step": self.step, "depth": self.depth_hint(), "train_time": self.train_time,
                  "wall_time": time.time(), **values}
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{kind}/{key}", value, self.step)

    def close(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    # -- checkpoints -----------------------------------------------------------------------------------------

    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save(self):
        """Atomically write everything needed to continue this run (every rank's RNG and data position)."""
        local = {"rng": rng_state(), "data": self.batches.state_dict()}
        per_rank = [None] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(per_rank, local)
        else:
            per_rank = [local]
        if self.rank == 0:
            module = unwrap(self.model)
            payload = {
                "run_config": self.run_config, "step": self.step, "train_time": self.train_time,
                "skipped_steps": self.skipped_steps, "skipped_in_a_row": self._skipped_in_a_row,
                "model_config": dataclasses.asdict(module.config),
                "model": module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "per_rank": per_rank,
                "hooks": [getattr(h, "state_dict", dict)() for h in self.hooks],
            }
            save_checkpoint(payload, self.checkpoint_path())
        self._saved_step = self.step
        if self.world_size > 1:
            dist.barrier()

    def resume(self, path=None):
        """Continue the run stored at `path` (default: this run's checkpoint); the run configs must agree."""
        checkpoint = load_checkpoint(path or self.checkpoint_path())
        differences = {k: (checkpoint["run_config"].get(k), v) for k, v in self.run_config.items()
                       if checkpoint["run_config"].get(k) != v}
        if differences:
            listed = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(differences.items()))
            raise CheckpointError(f"checkpoint belongs to another run configuration ({listed})")
        if len(checkpoint["per_rank"]) != self.world_size:
            raise CheckpointError(f"checkpoint was written by {len(checkpoint['per_rank'])} processes, "
                                  f"this run has {self.world_size}")
        for hook in self.hooks:
            if hasattr(hook, "restore"):
                hook.restore(self, checkpoint)
        unwrap(self.model).load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        for hook, state in zip(self.hooks, checkpoint["hooks"]):
            if hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state)
        mine = checkpoint["per_rank"][self.rank]
        self.batches.load_state_dict(mine["data"])
        set_rng_state(mine["rng"])
        self.step, self.train_time = checkpoint["step"], checkpoint["train_time"]
        self.skipped_steps, self._saved_step = checkpoint["skipped_steps"], checkpoint["step"]
        self._skipped_in_a_row = checkpoint.get("skipped_in_a_row", 0)  # a streak goes on across a resume
        return checkpoint


def count_tokens(cpu_batch) -> int:
    """Real tokens of a batch, counted on its CPU copy: counting on the device would sync every micro-batch."""
    if "attention_mask" in cpu_batch:
        return int(cpu_batch["attention_mask"].sum())
    return cpu_batch["input_ids"].numel()


def _tensorboard_writer(folder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: JSONL logs are always written
        return None
    return SummaryWriter(str(folder))


def linear_warmup_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup from 0 to 1 over warmup_steps, then linear decay to 0 at total_steps."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor
