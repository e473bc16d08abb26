"""Counting device-to-host syncs on the CPU: the Python calls that would make the host wait for a GPU."""

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import bertforge

PACKAGE = Path(bertforge.__file__).parent
# Calls that make the host wait for the device when their tensor is on a GPU.
SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
           "argwhere", "masked_select"}


class SyncRecorder(TorchFunctionMode):
    """Records syncing calls whose innermost bertforge frame is in one of `watched` (files or folders of the
    package), as (function, path relative to the package, line); calls made under a function of `host_side`
    ((file, function name) pairs: work done on CPU tensors by design, like a data collator's) are not counted."""

    def __init__(self, watched, host_side=()):
        super().__init__()
        self.watched = [PACKAGE / w for w in watched]
        self.host_side = {(PACKAGE / path, function) for path, function in host_side}
        self.calls = []

    def _on_host_side(self, frame) -> bool:
        while frame is not None:
            code = frame.f_code
            if (Path(code.co_filename), code.co_name) in self.host_side or \
                    (Path(code.co_filename), "*") in self.host_side:
                return True
            frame = frame.f_back
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_mask_index = name == "__getitem__" and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:]))
        if name in SYNCING or bool_mask_index:
            frame = sys._getframe(1)
            while frame is not None and PACKAGE not in Path(frame.f_code.co_filename).parents:
                frame = frame.f_back
            if frame is not None and not self._on_host_side(frame):
                path = Path(frame.f_code.co_filename)
                if any(path == w or w in path.parents for w in self.watched):
                    self.calls.append((name, path.relative_to(PACKAGE).as_posix(), frame.f_lineno))
        return func(*args, **(kwargs or {}))


def as_on_a_gpu(monkeypatch):
    """Make bertforge's value checks behave as for CUDA tensors (off unless BERTFORGE_DEBUG=1)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("bertforge") and hasattr(module, "checks_values"):
            monkeypatch.setattr(module, "checks_values", lambda t: False)
