"""The one place that knows the process's rank and the world size, and starts torch.distributed under torchrun."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


class RankTimeout(RuntimeError):
    """A collective waited longer than the process-group timeout: another rank is stopped, hung or dead."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_distributed(timeout_s: float = 600.0) -> torch.device:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPU, gloo on CPU); returns the device.

    A collective that waits longer than `timeout_s` (a rank stopped, hung or dead) fails the job instead of
    hanging it forever; NCCL's async error handling turns that timeout into an error on every rank.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def is_main_process() -> bool:
    """Rank 0, known from torchrun's environment even before torch.distributed starts."""
    return rank() == 0 if dist.is_initialized() else int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def timeouts_explained(timeout_s: float, where: str):
    """Turn a backend's timeout error (gloo: "Timed out waiting ...", NCCL: "... timed out ...") into RankTimeout."""
    try:
        yield
    except RuntimeError as error:
        if world_size() > 1 and "timed out" in str(error).lower():
            raise RankTimeout(f"rank {rank()}: {where}: waited more than {timeout_s:g} s for another rank (stopped, "
                              f"hung or dead); see that rank's output ({error})") from error
        raise
