"""The manifest of a dataset evaluation: the settings a resume must share with the run it continues, and the
fingerprints of the data and of the model that tell two runs apart."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import types
import warnings
import zlib
from typing import Any, Callable

import torch

from .inputs import item
from .records import atomic_write

FORMAT = "scoresolve.dataset_eval/1"  # on-disk format: unchanged, so that older output directories resume
MANIFEST = "manifest.json"
RESULTS = "results.json"
_INFO_KEYS = ("batch_size", "world_size", "fn")  # recorded, not checked on resume
_SEARCH_DEPTH = 4
_MAX_ITEMS = 64


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def data_fingerprint(data: Any) -> str:
    """``blake2b-all:<hex>``: a hash of every item (index, dtype, shape and bytes), so that a resume on data that
    differ in any row is refused. One pass over the data, cheap next to one likelihood solve. Identical for a tensor
    and a dataset yielding its rows."""
    h = hashlib.blake2b(digest_size=16)
    if torch.is_tensor(data):  # one pass over the bytes; the per-row headers are what the items would give
        t = data.detach().cpu().contiguous()
        row = t[0].numel() * t.element_size() if len(t) else 0
        raw = _tensor_bytes(t)
        for i in range(len(t)):
            h.update(f"{i}:{t.dtype}:{tuple(t.shape[1:])}\n".encode())
            h.update(raw[i * row : (i + 1) * row])
    else:
        for i in range(len(data)):
            t = item(data, i)
            h.update(f"{i}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(_tensor_bytes(t))
    return f"blake2b-all:{h.hexdigest()}"


SPOT_PREFIX = "crc32-spot16:"


def spot_fingerprint(data: Any) -> str:
    """CRC32 over 16 evenly spaced items: the data fingerprint of manifests written before `data_fingerprint` hashed
    every item (such runs resume when this spot check still matches)."""
    n = len(data)
    pos = sorted({round(k * (n - 1) / 15) for k in range(16)}) if n > 1 else [0]
    crc = 0
    for p in pos:
        t = item(data, p)
        crc = zlib.crc32(f"{p}:{t.dtype}:{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(_tensor_bytes(t), crc)
    return f"{SPOT_PREFIX}{crc:08x}"


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
                crc = zlib.crc32(_tensor_bytes(v), crc)
        return f"{name}:state-crc32={crc:08x}"
    return name


def module_fingerprint(module: torch.nn.Module) -> str:
    """``ClassName:blake2b=<hex>`` over the names, dtypes, shapes and bytes of every parameter and buffer."""
    h = hashlib.blake2b(digest_size=16)
    for kind, named in (("param", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(_tensor_bytes(t))
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
        digest = hashlib.blake2b(_tensor_bytes(v), digest_size=8).hexdigest()
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
    from ..score import ScoreModel

    found = _reachable(f, lambda obj: isinstance(obj, ScoreModel), True, _SEARCH_DEPTH)
    return "; ".join(
        f"ScoreModel(prediction={m.prediction!r}, time={_stable(m.time)}, num_timesteps={m.num_timesteps}, "
        f"net_kwargs={_stable(m.net_kwargs)}, process={_stable(m.sde)})"
        for m in found
    ) or None


def model_fingerprint(f: Any) -> str | None:
    """The fingerprint of the model behind a callable, stored in the manifest and checked on resume.

    A torch module: its class name and a hash of its parameters and buffers. Another callable: the fingerprints of
    the modules it reaches ([`reachable_modules`][scoresolve.evaluation.manifest.reachable_modules]), joined; None
    when it reaches none (nothing to compare: ``model_id`` names such a model).
    """
    modules = reachable_modules(f)
    return "; ".join(module_fingerprint(m) for m in modules) if modules else None


def run_identity(manifest: dict) -> int:
    """The identity of a run as a 52-bit integer: a hash of every manifest entry a resume must match (all but
    batch size, world size and the function's name). Every record carries it (key ``run``), so that records of two
    runs are never mixed, even when ``manifest.json`` was deleted."""
    checked = {k: v for k, v in manifest.items() if k not in _INFO_KEYS}
    digest = hashlib.blake2b(json.dumps(checked, sort_keys=True, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 12  # < 2^52: exact in JSON and in float64 columns


def _describe(dequantizer: Any) -> str:
    return "uniform (none given)" if dequantizer is None else json.dumps(dequantizer, sort_keys=True)


class ResumeError(ValueError):
    """An output directory holds a run that this one cannot continue (other settings, data or model, foreign
    records, a corrupt manifest, or a live run of the same rank)."""


def check_manifest(out_dir: str, manifest: dict, rank: int, data: Any = None) -> tuple[bool, frozenset[int]]:
    """Write ``manifest.json`` if it is missing; otherwise check that it describes this run (`ResumeError`, a
    ValueError, if not). ``data``: this run's data, for the spot check of a manifest written before full data hashes.
    Returns whether this call wrote the manifest, and the `run_identity` values that mark records of this run: this
    manifest's and the stored manifest's (which differs when it was written before one of this run's entries
    existed: its records carry its identity)."""
    path = os.path.join(out_dir, MANIFEST)
    created = not os.path.exists(path)
    if created:  # every rank of a run writes the same content, atomically
        atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    with open(path, encoding="utf-8") as f:
        try:
            old = json.load(f)
        except ValueError as e:
            raise ResumeError(f"{path} is not valid JSON ({e}); delete it only if the records belong to this "
                              "run") from None
    if not isinstance(old, dict):
        raise ResumeError(f"{path} holds {type(old).__name__}, not a manifest; delete it only if the records belong "
                          "to this run")
    idents = frozenset({run_identity(manifest), run_identity(old)})
    old_data = old.get("data_fingerprint")
    if isinstance(old_data, str) and old_data.startswith(SPOT_PREFIX) and data is not None:
        if old_data == spot_fingerprint(data):  # a run from before full hashes: its spot check still holds
            old["data_fingerprint"] = manifest.get("data_fingerprint")
    if isinstance(old, dict) and "num_levels" not in old and "num_levels" in manifest:
        # a run started before num_levels existed stored only bits: its L is 2^bits (None: continuous data)
        old_bits = old.get("bits")
        ok = type(old_bits) in (int, float) and old_bits == int(old_bits) and 1 <= old_bits <= 32
        old["num_levels"] = 2 ** int(old_bits) if ok else None
    if "threads" not in old:
        old["threads"] = manifest.get("threads")  # a run from before thread counts were recorded: not checked
    if "model_config" not in old:
        old["model_config"] = manifest.get("model_config")  # a run from before model configurations: not checked
    if isinstance(old, dict) and "model_fingerprint" not in old:
        old["model_fingerprint"] = manifest.get("model_fingerprint")  # a run from before fingerprints: not checked
    if old.get("model_fingerprint") != manifest.get("model_fingerprint"):
        raise ResumeError(
            f"cannot resume in {out_dir!r}: its records were computed with another model\n"
            f"  stored model fingerprint: {old.get('model_fingerprint')}\n"
            f"  this run's model:         {manifest.get('model_fingerprint')}\n"
            "use another out_dir, or restore the original model"
        )
    if old.get("dequantizer") != manifest.get("dequantizer"):  # absent: uniform dequantization (or none)
        raise ResumeError(
            f"cannot resume in {out_dir!r}: its records were computed with another dequantizer\n"
            f"  stored dequantizer: {_describe(old.get('dequantizer'))}\n"
            f"  this run's:         {_describe(manifest.get('dequantizer'))}\n"
            "use another out_dir, or pass the original dequantizer"
        )
    diffs = [
        f"  {k}: stored {old.get(k)!r}, now {manifest.get(k)!r}"
        for k in sorted(set(old) | set(manifest))
        if k not in _INFO_KEYS and old.get(k) != manifest.get(k)
    ]
    if diffs:
        raise ResumeError(
            f"cannot resume in {out_dir!r}: its manifest does not match this run's settings:\n"
            + "\n".join(diffs)
            + "\nuse another out_dir, or restore the original settings"
        )
    if old.get("batch_size") != manifest["batch_size"] and rank == 0:
        warnings.warn(
            f"resuming with batch_size {manifest['batch_size']} (the run started with {old.get('batch_size')}): "
            "remaining samples get other probe/generator draws than an uninterrupted run would",
            RuntimeWarning,
            stacklevel=3,
        )
    return created, idents
