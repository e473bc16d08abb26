"""Checkpoints that are written atomically, verified on load, and loaded without running code.

File layout: one header line "bertforge-checkpoint 2 sha256=<hex>\n", then the payload as `torch.save` writes it.
The hash covers the payload, so a flipped bit or a truncated file is refused by name instead of silently changing
a run; the payload holds only tensors and plain Python values, so `torch.load(weights_only=True)` reads it and a
crafted file cannot run code. Writes go through files.atomic_write: a crash or a full disk mid-write leaves the
previous checkpoint untouched.
"""

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write

FORMAT = 2
_HEADER = b"bertforge-checkpoint %d sha256=%s\n"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(payload: dict, path) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    header = _HEADER % (FORMAT, hashlib.sha256(body).hexdigest().encode())
    try:
        return atomic_write(path, lambda f: (f.write(header), f.write(body)))
    except BaseException as error:
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path} ({error}); {kept}") from error


def load_checkpoint(path) -> dict:
    """The payload of a checkpoint file, after checking its hash; CheckpointError names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    header, _, body = data.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 3 or fields[0] != b"bertforge-checkpoint" or not fields[2].startswith(b"sha256="):
        raise CheckpointError(f"{path} is not a bertforge checkpoint (or one written before format {FORMAT}, which "
                              "cannot be verified)")
    if fields[1] != str(FORMAT).encode():
        raise CheckpointError(f"{path} has checkpoint format {fields[1].decode(errors='replace')}; this bertforge "
                              f"reads format {FORMAT}")
    if hashlib.sha256(body).hexdigest().encode() != fields[2][len(b"sha256="):]:
        raise CheckpointError(f"{path} is corrupt: its content does not match the sha256 stored in it")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({error})") from error


def rng_state() -> dict:
    """Every RNG a run draws from, as tensors and plain values (loadable with weights_only)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt_state), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
