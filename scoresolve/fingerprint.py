"""Fingerprints of data and models: hashes that tell two runs apart (the dataset evaluation's manifest, the moment
store of `scoresolve.reverse_variance`). A library module of its own, below both, so that neither imports the
other's package."""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import types
import zlib
from typing import Any, Callable

import torch

_SEARCH_DEPTH = 4
_MAX_ITEMS = 64


def item(data: Any, i: int) -> torch.Tensor:
    """Sample ``i`` of a tensor or a map-style dataset (of a tuple item, its first element) as a tensor."""
    it = data[i]
    if isinstance(it, (tuple, list)):
        if not it:
            raise ValueError(f"dataset item {i} is empty")
        it = it[0]
    return torch.as_tensor(it)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (detached, on the host, contiguous)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def data_fingerprint(data: Any) -> str:
    """``blake2b-all:<hex>``: a hash of every item (index, dtype, shape and bytes), so that a resume on data that
    differ in any row is refused. One pass over the data, cheap next to one likelihood solve. Identical for a tensor
    and a dataset yielding its rows."""
    h = hashlib.blake2b(digest_size=16)
    if torch.is_tensor(data):  # one pass over the bytes; the per-row headers are what the items would give
        t = data.detach().cpu().contiguous()
        row = t[0].numel() * t.element_size() if len(t) else 0
        raw = tensor_bytes(t)
        for i in range(len(t)):
            h.update(f"{i}:{t.dtype}:{tuple(t.shape[1:])}\n".encode())
            h.update(raw[i * row : (i + 1) * row])
    else:
        for i in range(len(data)):
            t = item(data, i)
            h.update(f"{i}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(tensor_bytes(t))
    return f"blake2b-all:{h.hexdigest()}"


def callable_id(f: Any) -> str:
    """A name for a score model; a torch module (or an object with a module ``.net``) adds a checksum of its state.

    (The ``likelihood.score`` entry of manifests written by the default per-batch function: kept as it is so that
    those runs resume.)"""
    module = f if isinstance(f, torch.nn.Module) else getattr(f, "net", None)
    name = getattr(f, "__qualname__", type(f).__qualname__)
    if isinstance(module, torch.nn.Module):
        crc = 0
        for k, v in sorted(module.state_dict().items()):
            crc = zlib.crc32(k.encode(), crc)
            if torch.is_tensor(v):
                crc = zlib.crc32(tensor_bytes(v), crc)
        return f"{name}:state-crc32={crc:08x}"
    return name


def module_fingerprint(module: torch.nn.Module) -> str:
    """``ClassName:blake2b=<hex>`` over the names, dtypes, shapes and bytes of every parameter and buffer."""
    h = hashlib.blake2b(digest_size=16)
    for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(tensor_bytes(t))
    return f"{type(module).__qualname__}:blake2b={h.hexdigest()}"


def _children(obj: Any) -> list:
    if isinstance(obj, (str, bytes, torch.Tensor, type, types.ModuleType)):
        return []
    if isinstance(obj, functools.partial):
        return [obj.func, *obj.args, *obj.keywords.values()]
    if inspect.ismethod(obj):
        return [obj.__self__, obj.__func__]
    if inspect.isfunction(obj):
        out = []
        for cell in obj.__closure__ or ():
            try:
                out.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        return out
    if isinstance(obj, (list, tuple)):
        return list(obj[:_MAX_ITEMS])
    if isinstance(obj, dict):
        return list(obj.values())[:_MAX_ITEMS]
    if hasattr(obj, "__dict__"):
        return list(vars(obj).values())  # an object's attributes (e.g. ScoreModel.net)
    return []


def _reachable(f: Any, take: Callable[[Any], bool], descend: bool, depth: int) -> list:
    """The objects for which ``take`` holds that ``f`` reaches (see `reachable_modules`), in the order found;
    ``descend``: whether to look inside a taken object too."""
    found: list = []
    seen: set[int] = set()

    def visit(obj: Any, d: int) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if take(obj):
            found.append(obj)
            if not descend:
                return
        if d > 0:
            for child in _children(obj):
                visit(child, d - 1)

    visit(f, depth)
    return found


def reachable_modules(f: Any, depth: int = _SEARCH_DEPTH) -> list[torch.nn.Module]:
    """The torch modules a callable reaches: itself, a bound method's object, ``functools.partial`` arguments, the
    cells of a closure, an object's attributes and the items of lists, tuples and dicts (the first 64), followed up
    to ``depth`` levels (globals are not followed). Deduplicated, in the order found."""
    return _reachable(f, lambda obj: isinstance(obj, torch.nn.Module), False, depth)


def _stable(v: Any) -> str:
    """A text for a setting that is the same in every process: a tensor by dtype, shape and hash, a function by its
    qualified name, any other object by its repr without memory addresses."""
    if torch.is_tensor(v):
        digest = hashlib.blake2b(tensor_bytes(v), digest_size=8).hexdigest()
        return f"tensor({v.dtype}, {tuple(v.shape)}, blake2b={digest})"
    if inspect.isfunction(v) or inspect.ismethod(v) or inspect.isbuiltin(v):
        return f"{getattr(v, '__module__', '?')}.{v.__qualname__}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {_stable(x)}" for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))) + "}"
    return _ADDRESS.sub("", repr(v))


_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


def model_config(f: Any) -> str | None:
    """How the networks behind a callable are read: for every [`ScoreModel`][scoresolve.ScoreModel] it reaches (as
    `reachable_modules` follows objects), its prediction, time convention, ``num_timesteps``, ``net_kwargs`` and
    process, joined with "; ". The same network read as eps or as x0, at another time scale or under another process
    is another model, which `model_fingerprint` (the weights alone) cannot tell. None when it reaches no ScoreModel."""
    from .score import ScoreModel

    found = _reachable(f, lambda obj: isinstance(obj, ScoreModel), True, _SEARCH_DEPTH)
    return "; ".join(
        f"ScoreModel(prediction={m.prediction!r}, time={_stable(m.time)}, num_timesteps={m.num_timesteps}, "
        f"net_kwargs={_stable(m.net_kwargs)}, process={_stable(m.sde)})"
        for m in found
    ) or None


def model_fingerprint(f: Any) -> str | None:
    """The fingerprint of the model behind a callable, stored in the manifest and checked on resume.

    A torch module: its class name and a hash of its parameters and buffers. Another callable: the fingerprints of
    the modules it reaches ([`reachable_modules`][scoresolve.fingerprint.reachable_modules]), joined; None
    when it reaches none (nothing to compare: ``model_id`` names such a model).
    """
    modules = reachable_modules(f)
    return "; ".join(module_fingerprint(m) for m in modules) if modules else None
