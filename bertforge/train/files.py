"""Durable file writes: a file is fsync'ed before it counts as written, and a replaced file is swapped in whole.

    atomic_write(path, write)   write a temporary file beside `path`, fsync it, rename it over `path`, fsync the
                                folder: a crash or a full disk leaves either the old file or the new one
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"


def fsync_dir(folder) -> None:
    """Make a rename or a new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` with `write(file)` and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace `path` by what `write(file)` writes, all or nothing; on error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_temporaries(path) -> list[Path]:
    """Delete the temporary files that an atomic_write of `path` interrupted by a crash left behind."""
    path = Path(path)
    left = sorted(path.parent.glob(f".{path.name}.*{TEMPORARY_SUFFIX}")) if path.parent.is_dir() else []
    for stale in left:
        stale.unlink(missing_ok=True)
    return left
