"""Count, on CPU, the host-device synchronisations a solver would make on an accelerator.

Tag the input with `on_device` (a Tensor subclass that every operation on it propagates, so the network's output,
the solver's state, step sizes and errors derived from it are tagged too) and run the code inside `count_syncs`.
Every operation on a tagged tensor that needs its *values* on the host is recorded: ``bool()``, ``float()``,
``int()``, ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``, ``.nonzero()``, ``torch.where(cond)``, boolean-mask
indexing and the other ops whose output shape depends on values. On CUDA each of them blocks the host until the
device has caught up. Host-side tensors (time grids built from Python floats) are untagged and not counted.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_SYNCING = {
    "__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu", "nonzero", "argwhere",
    "masked_select", "unique", "unique_consecutive", "equal", "allclose",
}
_LOG: list[str] | None = None


def _is_mask(idx) -> bool:
    if torch.is_tensor(idx):
        return idx.dtype == torch.bool
    if isinstance(idx, (tuple, list)):
        return any(_is_mask(i) for i in idx)
    return False


def _syncing(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", "")
    if name in _SYNCING:
        return name
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _is_mask(args[1]):
        return name + "[mask]"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where(cond)"
    if name == "repeat_interleave" and "output_size" not in kwargs:
        return name
    return None


class OnDevice(torch.Tensor):
    """A tensor standing for one on an accelerator: host reads of its values are logged inside `count_syncs`."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _LOG is not None:
            what = _syncing(func, args, kwargs)
            if what is not None:
                _LOG.append(what)
        return super().__torch_function__(func, types, args, kwargs)


def on_device(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(OnDevice)


@contextmanager
def count_syncs():
    """``with count_syncs() as log: ...``: ``log`` lists the syncing operations on tagged tensors, in order."""
    global _LOG
    prev, _LOG = _LOG, []
    try:
        yield _LOG
    finally:
        _LOG = prev
