"""The manifest of a dataset evaluation: the settings a resume must share with the run it continues, and the
fingerprints of the data and of the model that tell two runs apart."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from typing import Any

from ..fingerprint import (  # noqa: F401  (the manifest's fingerprints, importable from here)
    callable_id,
    data_fingerprint,
    item,
    model_config,
    model_fingerprint,
    module_fingerprint,
    reachable_modules,
    tensor_bytes,
)
from .records import atomic_write

FORMAT = "scoresolve.dataset_eval/1"  # on-disk format: unchanged, so that older output directories resume
MANIFEST = "manifest.json"
RESULTS = "results.json"
_INFO_KEYS = ("batch_size", "world_size", "fn")  # recorded, not checked on resume

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
        crc = zlib.crc32(tensor_bytes(t), crc)
    return f"{SPOT_PREFIX}{crc:08x}"


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
