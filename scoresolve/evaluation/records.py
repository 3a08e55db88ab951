"""The crash-safe record store of a dataset evaluation: one append-only JSONL file per rank, checksummed lines.

A line is ``<crc32 of payload, 8 hex digits> <payload>\\n`` with payload the compact JSON of one record
``{"i": index, "r": repeat, "log_prob": .., ...}``. A line whose checksum, JSON, fields or trailing newline is wrong
is never used: readers skip it and the rank that owns the file rewrites it without the bad lines (atomically, then
fsync of the file and its directory). Each rank holds an exclusive lock on its own lock file while it runs, so that
two runs cannot write one rank's records at the same time.
"""

from __future__ import annotations

import json
import math
import os
import socket
import uuid
import warnings
import zlib
from typing import Any, Mapping

import torch

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_RECORD_PREFIX = "records-rank"
_RECORD_SUFFIX = ".jsonl"
_LOCK_PREFIX = "lock-rank"


def record_path(out_dir: str, rank: int) -> str:
    """The record file of ``rank`` in ``out_dir``."""
    return os.path.join(out_dir, f"{_RECORD_PREFIX}{rank:05d}{_RECORD_SUFFIX}")


def encode_record(rec: Mapping[str, Any]) -> bytes:
    """One record line: ``<crc32 hex> <compact JSON>\\n``."""
    payload = json.dumps(dict(rec), separators=(",", ":"), allow_nan=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_record(line: bytes) -> dict | None:
    """The record of one line (with its newline), or None if it is torn or corrupt in any way."""
    if len(line) < 11 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    payload = line[9:-1]
    if zlib.crc32(payload) != crc:
        return None
    try:
        rec = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    if not all(type(rec.get(k)) is int for k in ("i", "r")):
        return None
    for k, v in rec.items():
        if k not in ("i", "r") and v is not None and type(v) not in (int, float):
            return None
    if type(rec.get("log_prob")) not in (int, float):
        return None
    return rec


def scan_file(path: str, num_samples: int, repeats: int) -> tuple[list[tuple[bytes, dict]], int, bool]:
    """(valid (line, record) pairs, number of bad complete lines, whether an unterminated tail was found)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0, False
    parts = data.split(b"\n")
    tail = parts.pop()  # b"" when the file ends with a newline
    good, bad = [], 0
    for p in parts:
        line = p + b"\n"
        rec = decode_record(line)
        if rec is None or not (0 <= rec["i"] < num_samples and 0 <= rec["r"] < repeats):
            bad += 1
        else:
            good.append((line, rec))
    return good, bad, bool(tail)


def record_files(out_dir: str) -> list[tuple[int, str]]:
    """(rank, path) of every record file in ``out_dir``, by rank."""
    out = []
    for name in os.listdir(out_dir):
        if name.startswith(_RECORD_PREFIX) and name.endswith(_RECORD_SUFFIX):
            digits = name[len(_RECORD_PREFIX) : -len(_RECORD_SUFFIX)]
            if digits.isdigit():
                out.append((int(digits), os.path.join(out_dir, name)))
    return sorted(out)


def fsync_dir(path: str) -> None:
    """fsync a directory (so that a new or renamed entry survives a crash); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``path`` through a temporary file, fsync and rename: readers see the old or the new content."""
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def repair(path: str, good: list[tuple[bytes, dict]], bad: int, torn: bool) -> None:
    """Rewrite a record file without its bad lines, with a warning saying what was dropped."""
    what = []
    if bad:
        what.append(f"{bad} corrupt record line(s)")
    if torn:
        what.append("a torn final line")
    warnings.warn(
        f"{path}: dropping {' and '.join(what)}; the affected samples will be recomputed",
        RuntimeWarning,
        stacklevel=4,  # the caller of evaluate_dataset
    )
    atomic_write(path, b"".join(line for line, _ in good))


def same_value(a: Any, b: Any) -> bool:
    """Equality of stored values, with NaN equal to NaN."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def read_all(out_dir: str, num_samples: int, repeats: int) -> dict[tuple[int, int], dict]:
    """Every valid record in ``out_dir`` keyed by (index, repeat); the first of duplicates wins."""
    done: dict[tuple[int, int], dict] = {}
    for _, path in record_files(out_dir):
        good, _, _ = scan_file(path, num_samples, repeats)
        for _, rec in good:
            done.setdefault((rec["i"], rec["r"]), rec)
    return done


def as_columns(recs: list[dict]) -> dict[str, torch.Tensor]:
    """Records as columns: int64 ``index`` and ``repeat``, float64 for the rest (NaN where a record lacks a field)."""
    keys = []
    for r in recs:
        keys += [k for k in r if k not in keys]
    cols = {
        "index": torch.tensor([r["i"] for r in recs], dtype=torch.int64),
        "repeat": torch.tensor([r["r"] for r in recs], dtype=torch.int64),
    }
    for k in keys:
        if k not in ("i", "r", "run"):  # run: the identity every record carries (manifest.run_identity)
            cols[k] = torch.tensor(
                [float("nan") if r.get(k) is None else float(r[k]) for r in recs], dtype=torch.float64
            )
    return cols


class RunLockedError(RuntimeError):
    """Another live run holds the lock of this rank in the output directory."""


class RankLock:
    """An exclusive ``fcntl.flock`` on ``lock-rankNNNNN`` in ``out_dir``, held while a rank runs.

    The kernel releases the lock when its process dies (also on SIGKILL), so a crashed run never blocks a resume.
    Each rank locks its own file: the ranks of one run share ``out_dir``; two runs evaluating the same rank do not.
    The file records the holder's pid and host for the error message. Without ``fcntl`` (Windows) nothing is locked.
    """

    def __init__(self, out_dir: str, rank: int) -> None:
        self.path = os.path.join(out_dir, f"{_LOCK_PREFIX}{rank:05d}")
        self.out_dir, self.rank = out_dir, rank
        self._fd: int | None = None

    def __enter__(self) -> "RankLock":
        if fcntl is None:  # pragma: no cover - Windows
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"another run is evaluating rank {self.rank} in {self.out_dir!r} ({holder}, lock file "
                f"{self.path}); wait for it to finish or use another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
