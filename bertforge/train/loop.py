"""The one training loop every method runs on: data -> step -> log -> eval -> checkpoint.

    step: forward (bf16 autocast on GPU) -> loss / grad_accum -> backward -> clip -> optimizer -> schedule

A method is a hook: an object with any of these methods, called by the loop.
    on_step_start(trainer)          before each optimizer step (e.g. grow the model at a stage boundary)
    restore(trainer, checkpoint)    on resume, before the states load: rebuild the checkpoint's model shape
    state_dict() / load_state_dict  extra state to checkpoint
A hook that changes the model assigns `trainer.model` (stacking re-wraps a DDP model).
"""

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from bertforge.model.growth import depth, unwrap

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state

CHECKPOINT_NAME = "checkpoint.pt"


@dataclasses.dataclass
class LoopSettings:
    steps: int
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    log_interval: int = 10
    eval_interval: int = 100
    checkpoint_interval: int = 500
    out_dir: str = "runs/run"
    stop_after: int | None = None  # stop (with a checkpoint) once this many steps are done: a planned interruption
    progress: bool = True


class Trainer:
    """Holds the run's parts and runs the loop; `run_config` identifies the run so a resume can be checked."""

    def __init__(self, model, optimizer, scheduler, batches, evaluate, settings: LoopSettings, *,
                 hooks=(), run_config: dict | None = None, device=torch.device("cpu")):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.batches, self.evaluate, self.settings = batches, evaluate, settings
        self.hooks, self.run_config, self.device = list(hooks), run_config or {}, device
        self.step = 0
        self.train_time = 0.0  # seconds spent in training steps, excluding evaluation and checkpoints
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.out_dir = Path(settings.out_dir)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self._log_file = None
        self._tensorboard = None

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        s = self.settings
        last = min(s.steps, s.stop_after) if s.stop_after is not None else s.steps
        bar = tqdm(total=s.steps, initial=self.step, disable=not s.progress or self.rank != 0, desc="train",
                   dynamic_ncols=True)
        try:
            if self.step == 0 and s.eval_interval:
                self._evaluate()
            while self.step < last:
                for hook in self.hooks:
                    if hasattr(hook, "on_step_start"):
                        hook.on_step_start(self)
                started = time.perf_counter()
                loss, tokens = self._optimizer_step()
                self.train_time += time.perf_counter() - started
                self.step += 1
                bar.update(1)
                if self.step % s.log_interval == 0 or self.step == last:
                    self.log(kind="train", loss=loss, lr=self.scheduler.get_last_lr()[0],
                             tokens_per_s=tokens / max(time.perf_counter() - started, 1e-9))
                    bar.set_postfix(loss=f"{loss:.3f}", depth=self.depth_hint())
                if s.eval_interval and (self.step % s.eval_interval == 0 or self.step == s.steps):
                    self._evaluate()
                if self.step % s.checkpoint_interval == 0 or self.step == last:
                    self.save()
        except KeyboardInterrupt:
            self.save()  # nothing lost on Ctrl-C: the step counter says where to resume
            raise
        finally:
            bar.close()
            self.close()
        return {"step": self.step, "train_time": self.train_time}

    def _optimizer_step(self):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, tokens = 0.0, 0
        accum = self.settings.grad_accum
        for micro in range(accum):
            cpu_batch = next(self.batches)
            # Counted on the CPU copy: counting on the device would sync every micro-batch.
            tokens += int(cpu_batch["attention_mask"].sum()) if "attention_mask" in cpu_batch else cpu_batch["input_ids"].numel()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in cpu_batch.items()}
            sync = micro == accum - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast:
                loss = self.model(**batch).loss / accum
                loss.backward()
            total_loss += loss.item()
        if not math.isfinite(total_loss):
            raise FloatingPointError(f"loss is {total_loss} at step {self.step}; last checkpoint in {self.out_dir}")
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return total_loss, tokens * self.world_size

    def _evaluate(self):
        if self.rank != 0 or self.evaluate is None:
            return
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = self.evaluate(self.model)
        self.log(kind="eval", **metrics)

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
                "format": 1, "run_config": self.run_config, "step": self.step, "train_time": self.train_time,
                "model_config": dataclasses.asdict(module.config), "model": module.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "per_rank": per_rank, "hooks": [getattr(h, "state_dict", dict)() for h in self.hooks],
            }
            save_checkpoint(payload, self.checkpoint_path())
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
        return checkpoint


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


def setup_distributed():
    """Initialise torch.distributed when launched by torchrun (NCCL on GPU, gloo on CPU); returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")
