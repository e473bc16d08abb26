"""A run's output folder: never overwritten by accident, never shared by two live runs.

    with claim_run_folder(out_dir, resume=False, overwrite=False):
        ...  # train

A folder that holds a run (a checkpoint or a log) is refused unless the caller resumes it or overwrites it. The
owner holds an exclusive lock (flock) on `<out_dir>/.lock`, which also records its pid and host for the message
another process gets; the kernel drops the lock when the owner dies, so a stale lock file never blocks a new run.
"""

import contextlib
import fcntl
import os
import shutil
import socket
from pathlib import Path

from .files import remove_temporaries

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoint.pt", "log.jsonl")  # what makes a folder hold a run
RUN_FOLDERS = ("tensorboard",)


class RunFolderError(RuntimeError):
    pass


@contextlib.contextmanager
def claim_run_folder(out_dir, resume: bool, overwrite: bool, checkpoint_name: str = "checkpoint.pt"):
    """Lock `out_dir` for this process and check that starting (or resuming) a run there loses nothing."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderError(f"{folder} is in use by another run ({owner}); give another --out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        remove_temporaries(folder / checkpoint_name)  # half-written by a crash: never a valid checkpoint
        existing = [name for name in RUN_FILES + RUN_FOLDERS if (folder / name).exists()]
        if resume:
            if not (folder / checkpoint_name).exists():
                raise RunFolderError(f"--resume given but {folder / checkpoint_name} does not exist")
        elif existing and not overwrite:
            raise RunFolderError(f"{folder} already holds a run ({', '.join(existing)}); continue it with --resume "
                                 "true, replace it with --overwrite true, or give another --out_dir")
        elif existing:
            for name in existing:
                path = folder / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        yield folder
    finally:
        os.close(fd)  # releases the lock
