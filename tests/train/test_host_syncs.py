"""The GPU path must not wait on the host: a training step reads device memory from Python once.

Budget (documented in the README): one device-to-host sync per optimizer step, the loop reading one small tensor
[not finite, SIGINT, SIGTERM, loss]; none per layer or per micro-batch. Evaluation and checkpoints add theirs at
their intervals. Counted on the CPU by recording the syncing calls that bertforge's own code makes on the CUDA
code path (value checks off, as for CUDA tensors); the collator's CPU work is outside it by design. A
TorchFunctionMode does not see inside `loss.backward()`: the kernels' backward launch code is covered by
tests/kernels/test_attention.py (test_varlen_attention_on_a_gpu_reads_no_tensor_values), and on a GPU by the
set_sync_debug_mode test below.
"""

import warnings

import pytest
import torch
from host_syncs import SyncRecorder, as_on_a_gpu
from tiny_runs import tiny_config

from bertforge.train.pretrain import build_trainer

# What runs on the GPU: the loop, the model, the kernels' launch code (reference.py is the CPU path only).
GPU_PATH = ["train/loop.py", "model", "kernels/attention.py", "kernels/layer_norm.py", "kernels/gelu.py",
            "kernels/dropout.py", "kernels/padding.py", "kernels/_validate.py", "kernels/_triton.py"]

# Work on the CPU batch by design: the collator (building the batch, its packing and labelled positions) and the
# loop's count of real tokens.
HOST_SIDE = [("train/mlm.py", "*"), ("train/loop.py", "count_tokens")]


def test_a_training_step_syncs_the_host_once(corpus, tmp_path, monkeypatch):
    steps = 3
    cfg = tiny_config(corpus, tmp_path, stages=None, num_layers=2, steps=steps, grad_accum=2, eval_interval=0,
                      log_interval=1, checkpoint_interval=100)
    trainer = build_trainer(cfg)
    trainer.save = lambda: None  # checkpoints sync at their interval, not per step
    # The optimizer as build_optimizer makes it on a GPU: fused AdamW keeps its step counts on the device (the
    # CPU's foreach AdamW reads them with .item(), harmless there).
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainer.optimizer.param_groups]
    trainer.optimizer = torch.optim.AdamW(groups, fused=True)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    as_on_a_gpu(monkeypatch)
    with SyncRecorder(GPU_PATH, HOST_SIDE) as recorder:
        trainer.run()
    assert [(name, path) for name, path, _ in recorder.calls] == [("tolist", "train/loop.py")] * steps, \
        recorder.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_training_step_on_a_gpu_syncs_the_host_once(corpus, tmp_path, monkeypatch):
    """The same budget measured by CUDA itself: torch.cuda.set_sync_debug_mode warns at every sync."""
    monkeypatch.delenv("BERTFORGE_KERNELS")  # the Triton kernels, as a GPU run uses them
    cfg = tiny_config(corpus, tmp_path, stages=None, num_layers=2, steps=2, grad_accum=2, eval_interval=0,
                      log_interval=1, checkpoint_interval=100)
    trainer = build_trainer(cfg)
    trainer.save = lambda: None
    trainer.run()  # the first steps autotune and compile the kernels, which syncs
    trainer.settings.steps = 2 + 3
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3, "\n".join(str(w.message) for w in syncs)
