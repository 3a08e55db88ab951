"""Dataset likelihood evaluation that never loses work: per-sample records on disk, resume, shards across ranks.

Layout of ``out_dir``
---------------------
``manifest.json``            the run's settings (among them the data's number of levels ``num_levels`` and, for
                             L = 2^k, ``bits``); a resume with incompatible settings is an error.
``records-rank00000.jsonl``  append-only records written by rank 0 (one file per rank), one line per
                             (sample index, repeat) pair:  ``<crc32 of payload, 8 hex digits> <payload>\\n``,
                             payload = compact JSON ``{"i": index, "r": repeat, "log_prob": .., "bpd": .., "nfe": ..,
                             ...}`` (every other ``[batch]`` output of the per-batch function rides along, e.g.
                             ``prior_log_prob``, ``delta_log_prob``, ``std_error``). Floats are written with
                             Python's shortest round-trip repr, so values read back are bit-identical.
``results.json``             written by rank 0 at the end: ``summary`` and column-wise ``records`` sorted by
                             (repeat, index), one entry per pair.

Each batch's lines go out in one write followed by flush + fsync. A line whose checksum, JSON, fields or trailing
newline is wrong (a torn final line after a kill, a flipped byte) is dropped with a warning and its pair is
recomputed; it is never used. A rank rewrites its own file without the bad lines (atomically) before appending.

Work units and reproducibility
------------------------------
Samples are cut into global batches ``[b * batch_size, (b + 1) * batch_size)``; unit (repeat r, batch b) has number
``u = r * n_batches + b`` and belongs to rank ``u % world_size``. A unit with any missing pair is computed whole and
its missing pairs are written (its other pairs are compared with the stored values: a mismatch warns that the
per-batch function is not deterministic). Randomness comes only from seeds derived (blake2b, see
:func:`derive_seed`) from the run's ``seed``:

* dequantization noise of sample i in repeat r (quantized data, given by ``bits`` or ``num_levels``: level v goes
  to lo + (hi - lo) (v + u) / L): a CPU generator seeded with ``derive_seed("dequant", seed, r, i)`` draws
  u = ``torch.rand(sample_shape)``: independent of batch size, sharding, restarts and device;
* the generator handed to the per-batch function (e.g. Hutchinson probes), on the batch's device, seeded with
  ``derive_seed("batch", seed, r, start, stop)``: the same for every world size and every restart, given the same
  batch size.

So with a fixed ``batch_size``, results are bit-identical whatever the number of ranks and however often the run
was killed and resumed, provided the per-batch function is deterministic given (x, generator) (true on CPU; GPU
kernels may not be). A different ``batch_size`` on resume is allowed (with a warning): the remaining pairs then get
other probe draws, which are equally valid. A per-batch function whose per-sample result does not depend on its
batch-mates (exact divergence with a per-sample adaptive solver, or an exact density) gives identical results for
every batch size.

Distributed
-----------
With ``torch.distributed`` initialised (or ``rank``/``world_size`` given), each rank computes its units with no
collective inside the loop (adaptive solves take different numbers of steps per rank), then waits until the record
files in ``out_dir`` (which must be visible to every rank) hold every pair: this wait polls files, so a slow rank
cannot trip a process-group timeout. Every rank then builds the same summary from the files; rank 0 writes
``results.json``; with a process group a final barrier makes it visible before any rank returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
import uuid
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .dequantization import bin_offset, check_levels_range, dequantize_levels, grid_levels, levels_bits_per_dim
from .sde import SDE_NAMES

FORMAT = "scoresolve.dataset_eval/1"
MANIFEST = "manifest.json"
RESULTS = "results.json"
_RECORD_PREFIX = "records-rank"
_RECORD_SUFFIX = ".jsonl"
_RESERVED = ("i", "r", "bpd")

BatchFn = Callable[[torch.Tensor, torch.Generator], Any]


# --------------------------------------------------------------------------------------------------------------------
# seeds, records, files
# --------------------------------------------------------------------------------------------------------------------
def derive_seed(tag: str, *parts: int) -> int:
    """A 63-bit seed from a tag and integers: blake2b-64 of ``"tag:p0:p1:..."``, little-endian, top bit cleared."""
    text = ":".join([tag, *(str(int(p)) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def _scan_file(path: str, num_samples: int, repeats: int) -> tuple[list[tuple[bytes, dict]], int, bool]:
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


def _record_files(out_dir: str) -> list[tuple[int, str]]:
    out = []
    for name in os.listdir(out_dir):
        if name.startswith(_RECORD_PREFIX) and name.endswith(_RECORD_SUFFIX):
            digits = name[len(_RECORD_PREFIX) : -len(_RECORD_SUFFIX)]
            if digits.isdigit():
                out.append((int(digits), os.path.join(out_dir, name)))
    return sorted(out)


def _fsync_dir(path: str) -> None:
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


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _repair(path: str, good: list[tuple[bytes, dict]], bad: int, torn: bool) -> None:
    """Rewrite a record file without its bad lines, with a warning saying what was dropped."""
    what = []
    if bad:
        what.append(f"{bad} corrupt record line(s)")
    if torn:
        what.append("a torn final line")
    warnings.warn(
        f"{path}: dropping {' and '.join(what)}; the affected samples will be recomputed",
        RuntimeWarning,
        stacklevel=3,
    )
    _atomic_write(path, b"".join(line for line, _ in good))


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _read_all(out_dir: str, num_samples: int, repeats: int) -> dict[tuple[int, int], dict]:
    """Every valid record in ``out_dir`` keyed by (index, repeat); the first of duplicates wins."""
    done: dict[tuple[int, int], dict] = {}
    for _, path in _record_files(out_dir):
        good, _, _ = _scan_file(path, num_samples, repeats)
        for _, rec in good:
            done.setdefault((rec["i"], rec["r"]), rec)
    return done


# --------------------------------------------------------------------------------------------------------------------
# data, manifest
# --------------------------------------------------------------------------------------------------------------------
def _item(data: Any, i: int) -> torch.Tensor:
    item = data[i]
    if isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"dataset item {i} is empty")
        item = item[0]
    return torch.as_tensor(item)


def _batch(data: Any, start: int, stop: int) -> torch.Tensor:
    if torch.is_tensor(data):
        return data[start:stop]
    return torch.stack([_item(data, i) for i in range(start, stop)])


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def data_fingerprint(data: Any) -> str:
    """CRC32 over 16 evenly spaced items (index, dtype, shape and bytes): a spot check that a resume sees the same
    data, cheap for datasets that load from disk. Identical for a tensor and a dataset yielding its rows."""
    n = len(data)
    pos = sorted({round(k * (n - 1) / 15) for k in range(16)}) if n > 1 else [0]
    crc = 0
    for p in pos:
        t = _item(data, p)
        crc = zlib.crc32(f"{p}:{t.dtype}:{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(_tensor_bytes(t), crc)
    return f"crc32-spot16:{crc:08x}"


def _callable_id(f: Any) -> str:
    """A name for a score model; a torch module (or an object with a module ``.net``) adds a checksum of its state."""
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


_INFO_KEYS = ("batch_size", "world_size", "fn")


def _check_manifest(out_dir: str, manifest: dict, rank: int) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):  # every rank of a run writes the same content, atomically
        _atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    with open(path, encoding="utf-8") as f:
        try:
            old = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); delete it only if the records belong to this run") from e
    if isinstance(old, dict) and "num_levels" not in old and "num_levels" in manifest:
        # a run started before num_levels existed stored only bits: its L is 2^bits (None: continuous data)
        old_bits = old.get("bits")
        ok = type(old_bits) in (int, float) and old_bits == int(old_bits) and 1 <= old_bits <= 32
        old["num_levels"] = 2 ** int(old_bits) if ok else None
    diffs = [
        f"  {k}: stored {old.get(k)!r}, now {manifest.get(k)!r}"
        for k in sorted(set(old) | set(manifest))
        if k not in _INFO_KEYS and old.get(k) != manifest.get(k)
    ]
    if diffs:
        raise ValueError(
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


# --------------------------------------------------------------------------------------------------------------------
# per-batch function
# --------------------------------------------------------------------------------------------------------------------
def _import_log_likelihood() -> Callable:
    from .likelihood import log_likelihood

    return log_likelihood


def likelihood_fn(score: Callable, sde: Any, **likelihood_kwargs: Any) -> BatchFn:
    """The default per-batch function: ``fn(x, generator) = log_likelihood(score, x, sde, generator=..., **kw)``."""
    if "generator" in likelihood_kwargs:
        raise ValueError("the generator is supplied per batch by evaluate_dataset; do not pass one")

    def fn(x: torch.Tensor, generator: torch.Generator) -> Any:
        return _import_log_likelihood()(score, x, sde, generator=generator, **likelihood_kwargs)

    return fn


def _columns(out: Any, batch: int) -> dict[str, list]:
    """The per-sample outputs of a per-batch function as lists of Python floats (float64)."""
    strict = True
    if torch.is_tensor(out):
        out = {"log_prob": out}
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        out, strict = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}, False
    elif not isinstance(out, Mapping):
        if not hasattr(out, "log_prob"):
            raise TypeError(f"the per-batch function returned {type(out).__name__}; expected a mapping or tensor")
        out, strict = {k: v for k, v in vars(out).items() if not k.startswith("_")}, False
    if "log_prob" not in out:
        raise ValueError(f"the per-batch function must return 'log_prob'; got keys {sorted(out)}")
    cols: dict[str, list] = {}
    for k, v in out.items():
        if v is None:
            continue
        if k in _RESERVED:
            raise ValueError(f"the per-batch function returned the reserved key {k!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = torch.full((batch,), float(v), dtype=torch.float64)
        if not torch.is_tensor(v) or not (v.shape == (batch,) or (v.numel() == 1 and k == "nfe")):
            if strict or k == "log_prob":
                shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                raise ValueError(f"per-batch output {k!r} must have shape [{batch}], got {shape}")
            continue
        cols[k] = v.detach().to("cpu", torch.float64).expand(batch).tolist()
    return cols


# --------------------------------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSummary:
    """Result of [`evaluate_dataset`][scoresolve.evaluate_dataset] (also stored under ``summary`` in ``results.json``).

    Attributes:
        count: number of samples N (each evaluated ``repeats`` times).
        mean_log_prob: mean log p (nats) over all records.
        mean_bpd: mean bits/dim (with the dequantization offset log2(L / (hi - lo)) when the data's L levels are
            given by ``bits`` or ``num_levels``, plain -log p / (D ln 2) for continuous data).
        bpd_std_error: standard error of ``mean_bpd``: std of the per-sample means over repeats divided by
            sqrt(N) (NaN for N = 1).
        mean_nfe: mean number of function evaluations per record (None if the function reports none).
        path: the ``results.json`` file.
        repeats, num_dims, log_prob_std_error: as named.
    """

    count: int
    mean_log_prob: float
    mean_bpd: float
    bpd_std_error: float
    mean_nfe: float | None
    path: str
    repeats: int = 1
    num_dims: int = 0
    log_prob_std_error: float = float("nan")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world_size, whether a process group of exactly these ranks is available for a final barrier)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        if initialised:
            return dist.get_rank(), dist.get_world_size(), True
        return 0, 1, False
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    if int(world_size) != world_size or world_size < 1 or int(rank) != rank or not 0 <= rank < world_size:
        raise ValueError(f"need integers 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    same = initialised and (dist.get_rank(), dist.get_world_size()) == (rank, world_size)
    return int(rank), int(world_size), same


def resolve_levels(bits: int | None, num_levels: int | None, data_range: Sequence[float] = (-1.0, 1.0)) -> int | None:
    """The number of quantisation levels L of the data from ``bits`` (L = 2^k) or ``num_levels`` (L itself).

    Args:
        bits: k of k-bit data (an integer in [1, 32]), or None.
        num_levels: L (an integer >= 2), or None.
        data_range: (lo, hi) of the data, checked to be finite with lo < hi when a quantisation is given.
    Returns:
        L, or None when both are None (continuous data, no dequantization).
    Raises:
        ValueError: an invalid ``bits``, ``num_levels`` or ``data_range``, or ``bits`` and ``num_levels`` that
            disagree (both may be given only if num_levels == 2^bits).
    """
    if bits is None and num_levels is None:
        return None
    L = None
    if bits is not None:
        bin_offset(bits, data_range)  # validates bits (an integer in [1, 32]) and data_range
        L = 2 ** int(bits)
    if num_levels is not None:
        check_levels_range(num_levels, data_range)
        if L is not None and int(num_levels) != L:
            raise ValueError(
                f"bits={bits!r} (2^{int(bits)} = {L} levels) and num_levels={num_levels!r} disagree: give one of them"
            )
        L = int(num_levels)
    return L


def _pow2_bits(num_levels: int) -> int | None:
    """k if L = 2^k with k in [1, 32] (the range of the k-bit helpers), else None."""
    k = int(num_levels).bit_length() - 1
    return k if 1 <= k <= 32 and 1 << k == num_levels else None


def _grid_name(num_levels: int) -> str:
    k = _pow2_bits(num_levels)
    return f"{k}-bit" if k is not None else f"{int(num_levels)}-level"


def _dequantized(
    x: torch.Tensor, indices: Sequence[int], repeat: int, seed: int, num_levels: int, data_range: Any,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
    noise = torch.stack(
        [
            torch.rand(
                x.shape[1:],
                generator=torch.Generator().manual_seed(derive_seed("dequant", seed, repeat, i)),
                dtype=dtype,
            )
            for i in indices
        ]
    )
    return dequantize_levels(x.to(dtype) if x.is_floating_point() else x, num_levels, data_range, noise=noise,
                             what=_grid_name(num_levels))


def dequantized_samples(
    data: Any,
    indices: Sequence[int],
    repeat: int,
    seed: int,
    bits: int | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    *,
    num_levels: int | None = None,
) -> torch.Tensor:
    """The exact dequantized inputs that :func:`evaluate_dataset` fed to the per-batch function for these samples.

    Args:
        data: the dataset given to :func:`evaluate_dataset`.
        indices: sample indices.
        repeat: the repeat r.
        seed: the run's seed.
        bits: k of k-bit data (L = 2^k levels), or None when ``num_levels`` is given.
        data_range: (lo, hi) of the data.
        num_levels: L, the number of levels (an alternative to ``bits``; exactly one of them determines L).
    Returns:
        ``[len(indices), *sample_shape]``: each sample's level i mapped to lo + (hi - lo) (i + u) / L, u ~ U[0, 1).
    """
    L = resolve_levels(bits, num_levels, data_range)
    if L is None:
        raise ValueError("give bits or num_levels: dequantized_samples needs the data's quantisation")
    x = torch.stack([_item(data, i) for i in indices])
    return _dequantized(x, list(indices), repeat, seed, L, data_range)


def read_records(out_dir: str, num_samples: int | None = None, repeats: int | None = None) -> dict[str, torch.Tensor]:
    """All valid records in ``out_dir`` as float64 columns sorted by (repeat, index), duplicates removed.

    ``index`` and ``repeat`` are int64; a field that some records lack is NaN there. The sample count and repeats
    default to the manifest's.
    """
    if num_samples is None or repeats is None:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        num_samples = m["num_samples"] if num_samples is None else num_samples
        repeats = m["repeats"] if repeats is None else repeats
    recs = _read_all(out_dir, num_samples, repeats)
    return _as_columns([recs[k] for k in sorted(recs, key=lambda k: (k[1], k[0]))])


def _as_columns(recs: list[dict]) -> dict[str, torch.Tensor]:
    keys = []
    for r in recs:
        keys += [k for k in r if k not in keys]
    cols = {
        "index": torch.tensor([r["i"] for r in recs], dtype=torch.int64),
        "repeat": torch.tensor([r["r"] for r in recs], dtype=torch.int64),
    }
    for k in keys:
        if k not in ("i", "r"):
            cols[k] = torch.tensor(
                [float("nan") if r.get(k) is None else float(r[k]) for r in recs], dtype=torch.float64
            )
    return cols


def _summarize(recs: list[dict], num_samples: int, repeats: int, num_dims: int, path: str) -> EvalSummary:
    lp = torch.tensor([r["log_prob"] for r in recs], dtype=torch.float64).reshape(repeats, num_samples)
    bpd = torch.tensor([r["bpd"] for r in recs], dtype=torch.float64).reshape(repeats, num_samples)
    nfes = [r.get("nfe") for r in recs]
    mean_nfe = None if any(v is None for v in nfes) else float(torch.tensor(nfes, dtype=torch.float64).mean())

    def se(v: torch.Tensor) -> float:  # v: [R, N] -> standard error of the mean, samples as units
        m = v.mean(0)
        return float(m.std(unbiased=True)) / math.sqrt(num_samples) if num_samples > 1 else float("nan")

    if not bool(torch.isfinite(lp).all()):
        bad = int((~torch.isfinite(lp)).sum())
        warnings.warn(
            f"{bad} record(s) have a non-finite log_prob; the means are not finite", RuntimeWarning, stacklevel=3
        )
    return EvalSummary(
        count=num_samples,
        mean_log_prob=float(lp.mean()),
        mean_bpd=float(bpd.mean()),
        bpd_std_error=se(bpd),
        mean_nfe=mean_nfe,
        path=path,
        repeats=repeats,
        num_dims=num_dims,
        log_prob_std_error=se(lp),
    )


def _wait_complete(
    out_dir: str, num_samples: int, repeats: int, world_size: int, timeout: float | None, poll_interval: float
) -> dict[tuple[int, int], dict]:
    total = num_samples * repeats
    start, delay = time.monotonic(), 0.02
    while True:
        done = _read_all(out_dir, num_samples, repeats)
        if len(done) == total:
            return done
        if world_size == 1:
            raise RuntimeError(
                f"{total - len(done)} of {total} records are missing in {out_dir!r} after the "
                "evaluation; was the directory modified by another process during the run?"
            )
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(
                f"waited {timeout} s for other ranks: {total - len(done)} of {total} records still "
                f"missing in {out_dir!r}"
            )
        time.sleep(delay)
        delay = min(2 * delay, poll_interval)


def evaluate_dataset(
    data: torch.Tensor | Any,
    out_dir: str,
    *,
    fn: BatchFn | None = None,
    score: Callable | None = None,
    sde: Any = None,
    batch_size: int = 64,
    repeats: int = 1,
    seed: int = 0,
    bits: int | None = None,
    num_levels: int | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    model_id: str | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    wait_timeout: float | None = None,
    poll_interval: float = 2.0,
    **likelihood_kwargs: Any,
) -> EvalSummary:
    """Log-likelihood (and bits/dim) of every sample of a dataset, resumable and sharded (see the module docstring).

    Args:
        data: a tensor ``[N, ...]`` or a map-style dataset (``len`` and ``[i]``) whose items are tensors or tuples
            ``(tensor, label, ...)``.
        out_dir: directory of the manifest, the per-rank record files and ``results.json``; created if needed.
            Resuming is automatic: an existing run there continues where it stopped.
        fn: per-batch function ``fn(x, generator) -> {"log_prob": [B], "nfe": [B], ...}`` (also accepted: a
            ``[B]`` tensor of log p, or a result object such as ``LikelihoodResult``, whose ``[B]`` fields are kept).
            Default: ``likelihood_fn`` of ``score`` and ``sde`` (``scoresolve.likelihood.log_likelihood``).
        score: the model of the default ``fn``.
        sde: its forward SDE.
        likelihood_kwargs: settings of the default ``fn`` (passed to ``log_likelihood``).
        batch_size: samples per call of ``fn`` (part of the seeding of ``fn``'s generator; see module docstring).
        repeats: evaluations of every sample, each with fresh dequantization noise and generator draws.
        seed: root of every seed.
        bits: k for k-bit data, i.e. L = 2^k levels (an integer in [1, 32]); see ``num_levels``.
        num_levels: L, the number of quantisation levels (an integer >= 2, e.g. 17 for the digits): an alternative
            to ``bits`` for any L. With L given (by exactly one of the two, or by both if num_levels == 2^bits),
            the data must lie on the grid lo + (hi - lo) i / (L - 1), i = 0 .. L - 1, of ``data_range`` (or be
            integer levels i); each sample is uniformly dequantized to lo + (hi - lo) (i + u) / L, u ~ U[0, 1)^D,
            and its bits/dim is -log p / (D ln 2) + log2(L / (hi - lo)) (``scoresolve.dequantization``,
            ``scoresolve.data``; L = 2^k gives exactly the numbers of ``bits=k``). Both None (default):
            the data are evaluated as they are and bits/dim is plain -log p / (D ln 2). L is stored in the
            manifest: resuming with another L is an error.
        data_range: (lo, hi) of the data.
        dtype: floating dtype of the batches passed to ``fn``: floating data are cast to it, integer levels are
            dequantized in it (default: floating data keep theirs, integer data take ``torch.get_default_dtype()``).
            Stored in the manifest.
        device: where batches go before ``fn`` (dequantization happens on the CPU first).
        model_id: a string naming the model, stored in the manifest and checked on resume (the default ``fn``
            records the score's name, with a checksum of its weights for a torch module, and the SDE).
        progress: a tqdm bar of this rank's samples (rank 0 only).
        rank: this process's shard (default: from ``torch.distributed`` when initialised, else 0).
        world_size: number of shards (default: from ``torch.distributed`` when initialised, else 1).
        wait_timeout: seconds to wait for the other ranks' records at the end (default: forever).
        poll_interval: longest pause between reads of the record files while waiting.

    Returns:
        The [`EvalSummary`][scoresolve.EvalSummary] of all N x repeats records (log p in nats, bits/dim per
        dimension).

    Raises:
        ValueError: invalid settings (among them ``bits`` and ``num_levels`` that disagree, or L < 2; see
            ``scoresolve.dataset_eval.resolve_levels``), data off the declared grid, or an ``out_dir`` holding a
            run with other settings.
    """
    rank, world_size, barrier = _resolve_rank(rank, world_size)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    batch_size, repeats, seed = int(batch_size), int(repeats), int(seed)
    if fn is None:
        if score is None or sde is None:
            raise ValueError("give either fn, or score and sde for the default log_likelihood")
        fn = likelihood_fn(score, sde, **likelihood_kwargs)
        likelihood = {
            "score": _callable_id(score),
            "sde": repr(sde),
            "kwargs": {k: repr(v) for k, v in sorted(likelihood_kwargs.items())},
        }
    else:
        if score is not None or sde is not None or likelihood_kwargs:
            extra = sorted(likelihood_kwargs) + [k for k, v in (("score", score), ("sde", sde)) if v is not None]
            raise ValueError(f"with an explicit fn these arguments would be ignored: {extra}")
        likelihood = None
    N = len(data)
    if N == 0:
        raise ValueError("the dataset is empty")
    first = _item(data, 0)
    if first.ndim == 0:
        raise ValueError("dataset items must be tensors with at least one dimension (use shape [1] for scalars)")
    num_dims = first.numel()
    L = resolve_levels(bits, num_levels, data_range)
    if L is None and not first.is_floating_point():
        raise ValueError(
            f"the data are {first.dtype}: give bits or num_levels (and data_range) to dequantize integer data"
        )
    if L is not None:
        grid_levels(first, L, data_range, _grid_name(L))  # fail early on the wrong bits / num_levels / data_range
        lo, hi = (float(v) for v in data_range)
        data_range_m: list | None = [lo, hi]
    else:
        data_range_m = None
    manifest = {
        "format": FORMAT,
        "num_samples": N,
        "sample_shape": list(first.shape),
        "repeats": repeats,
        "seed": seed,
        # L is what the numbers depend on; bits is k for L = 2^k (else None), as runs before num_levels stored it
        "bits": None if L is None else _pow2_bits(L),
        "num_levels": L,
        "data_range": data_range_m,
        "dtype": None if dtype is None else str(dtype),
        "data_fingerprint": data_fingerprint(data),
        "likelihood": likelihood,
        "model_id": model_id,
        "batch_size": batch_size,
        "world_size": world_size,
        "fn": getattr(fn, "__qualname__", type(fn).__qualname__),
    }
    os.makedirs(out_dir, exist_ok=True)
    _check_manifest(out_dir, manifest, rank)

    # --- what is done: read every rank's file; repair our own (and, on rank 0, files of ranks that no longer exist)
    done: dict[tuple[int, int], dict] = {}
    for r_file, path in _record_files(out_dir):
        good, bad, torn = _scan_file(path, N, repeats)
        if (bad or torn) and (r_file == rank or (rank == 0 and r_file >= world_size)):
            _repair(path, good, bad, torn)
        for _, rec in good:
            done.setdefault((rec["i"], rec["r"]), rec)

    n_batches = -(-N // batch_size)
    units = [(r, b) for r in range(repeats) for b in range(n_batches) if (r * n_batches + b) % world_size == rank]
    span = lambda b: range(b * batch_size, min(N, (b + 1) * batch_size))  # noqa: E731
    mine = sum(len(span(b)) for _, b in units)
    todo = [(r, b) for r, b in units if any((i, r) not in done for i in span(b))]
    missing = sum(1 for r, b in todo for i in span(b) if (i, r) not in done)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        desc = "log-likelihood" if world_size == 1 else f"log-likelihood (rank 0 of {world_size})"
        bar = tqdm(total=mine, initial=mine - missing, desc=desc, unit="sample")
    own = record_path(out_dir, rank)
    new_file = not os.path.exists(own)
    mismatch_warned = False
    try:
        with open(own, "ab") as f:
            if new_file:
                _fsync_dir(out_dir)
            for r, b in todo:
                idx = span(b)
                x = _batch(data, idx.start, idx.stop)
                if L is not None:
                    x = _dequantized(x, idx, r, seed, L, data_range, dtype)
                elif dtype is not None:
                    x = x.to(dtype)
                if device is not None:
                    x = x.to(device)
                gen = torch.Generator(device=x.device).manual_seed(derive_seed("batch", seed, r, idx.start, idx.stop))
                cols = _columns(fn(x, gen), len(idx))
                lp = torch.tensor(cols["log_prob"], dtype=torch.float64)
                cols["bpd"] = levels_bits_per_dim(lp, num_dims, L, data_range).tolist()
                lines = []
                for j, i in enumerate(idx):
                    rec = {"i": i, "r": r, "log_prob": cols["log_prob"][j], "bpd": cols["bpd"][j]}
                    rec.update({k: v[j] for k, v in cols.items() if k not in rec})
                    old = done.get((i, r))
                    if old is None:
                        lines.append(encode_record(rec))
                        done[(i, r)] = rec
                    elif not mismatch_warned and any(not _same(old[k], v) for k, v in rec.items() if k in old):
                        mismatch_warned = True
                        warnings.warn(
                            f"recomputing batch {idx.start}:{idx.stop} (repeat {r}) gave values that differ from the "
                            "stored records: the per-batch function is not deterministic; stored values are kept",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(lines))
    finally:
        if bar is not None:
            bar.close()

    # --- gather: wait for every pair on disk (no collective: ranks may finish far apart), summarise
    allrec = _wait_complete(out_dir, N, repeats, world_size, wait_timeout, poll_interval)
    recs = [allrec[(i, r)] for r in range(repeats) for i in range(N)]
    results = os.path.join(out_dir, RESULTS)
    summary = _summarize(recs, N, repeats, num_dims, os.path.abspath(results))
    if rank == 0:
        body = {
            "format": FORMAT,
            "summary": summary.to_dict(),
            "manifest": manifest,
            "records": {k: v.tolist() for k, v in _as_columns(recs).items()},
        }
        _atomic_write(results, (json.dumps(body, allow_nan=True) + "\n").encode())
    if barrier:
        torch.distributed.barrier()
    return summary


# --------------------------------------------------------------------------------------------------------------------
# command line: `scoresolve likelihood`
# --------------------------------------------------------------------------------------------------------------------
def _bits_arg(text: str) -> int:
    """argparse type of ``--bits``: an integer in [1, 32]."""
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= k <= 32:
        raise argparse.ArgumentTypeError(f"bits must lie in [1, 32], got {k}")
    return k


def _num_levels_arg(text: str) -> int:
    """argparse type of ``--num-levels``: an integer >= 2."""
    try:
        L = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if L < 2:
        raise argparse.ArgumentTypeError(f"the number of levels must be at least 2, got {L}")
    return L


class _LevelsAction(argparse.Action):
    """Stores ``--bits`` / ``--num-levels`` and rejects the pair (whatever their order) if 2^bits != num_levels."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        bits, levels_ = getattr(namespace, "bits", None), getattr(namespace, "num_levels", None)
        if bits is not None and levels_ is not None and 2**bits != levels_:
            parser.error(
                f"--bits {bits} (2^{bits} = {2**bits} levels) and --num-levels {levels_} disagree: give one of them"
            )


def add_likelihood_args(p: argparse.ArgumentParser) -> None:
    """Options of ``scoresolve likelihood`` (the model is the built-in analytic Gaussian mixture).

    The data's quantisation is ``--bits K`` (2^K levels) or ``--num-levels L`` (any L >= 2; both only if
    L = 2^K, otherwise an argparse error); with neither, the data are evaluated as continuous.
    """
    p.add_argument("--out-dir", default="likelihood_eval", help="records, manifest and results (resumable)")
    p.add_argument(
        "--data",
        default=None,
        help="a .pt file holding a tensor [N, ...] or a dict with key 'x' (default: mixture samples)",
    )
    p.add_argument(
        "--num-samples",
        "--n",
        dest="n",
        type=int,
        default=256,
        help="samples of the built-in mixture dataset (default: 256; under torchrun write --num-samples: "
        "torchrun rejects --n as an ambiguous abbreviation of its own options)",
    )
    p.add_argument("--sde", choices=sorted(SDE_NAMES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--dim", type=int, default=16, help="dimension of the mixture (default: 16; --data sets it)")
    p.add_argument("--components", type=int, default=8, help="mixture components (default: 8)")
    p.add_argument("--diagonal", action="store_true", help="axis-aligned components instead of correlated ones")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="evaluations per sample (fresh noise each)")
    p.add_argument("--divergence", default="hutchinson", help="divergence estimator (hutchinson | exact)")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per sample")
    p.add_argument("--probe", default="rademacher", help="probe distribution (rademacher | gaussian)")
    p.add_argument("--solver", default="dopri5")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--t-eps", type=float, default=1e-5, help="start time of the likelihood ODE (default: 1e-5)")
    p.add_argument(
        "--bits",
        type=_bits_arg,
        default=None,
        action=_LevelsAction,
        help="k-bit data (2^k levels): dequantize them and add the bits/dim offset log2(2^k / (HI - LO))",
    )
    p.add_argument(
        "--num-levels",
        type=_num_levels_arg,
        default=None,
        action=_LevelsAction,
        metavar="L",
        help="L-level data (any L >= 2, e.g. 17 for the digits), an alternative to --bits: dequantize them on "
        "their L levels and add the bits/dim offset log2(L / (HI - LO))",
    )
    p.add_argument("--data-range", type=float, nargs=2, default=(-1.0, 1.0), metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--float64", action="store_true", help="evaluate in float64 (default float32)")
    p.add_argument("--device", default=None, help="device of the solve (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_likelihood)


def _maybe_init_distributed() -> bool:
    """Initialise the process group from torchrun's environment (env://) if needed; True if we did."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://")
    return True


def cmd_likelihood(args: argparse.Namespace) -> int:
    """Evaluate log p_{t_eps} of a dataset under the analytic mixture with the real ODE likelihood, next to the
    exact value ``gm.log_prob(x, t_eps, sde)``; the error is split into the prior mismatch (exact, a property of
    the SDE's finite T, not of the solver) and the rest. Works under ``torchrun`` (each rank takes its shard).

    With ``--bits K`` or ``--num-levels L`` the data (``--data``: grid values in ``--data-range`` or integer
    levels) are dequantized on their L = 2^K or L levels, the exact value is taken at the same dequantized inputs,
    and bits/dim includes the offset log2(L / (HI - LO)).

    Returns:
        0 (the exit status); the report is printed on rank 0.
    """
    from .analytic import GaussianMixture
    from .sde import sde_from_name

    sde = sde_from_name(args.sde)
    num_levels = resolve_levels(args.bits, getattr(args, "num_levels", None), tuple(args.data_range))
    dtype = torch.float64 if args.float64 else torch.float32
    if args.data:
        obj = torch.load(args.data, map_location="cpu")
        data = obj["x"] if isinstance(obj, Mapping) else obj
        if not torch.is_tensor(data) or data.ndim < 2:
            raise SystemExit(f"{args.data}: expected a tensor [N, ...] (or a dict with key 'x')")
        event_shape = tuple(data.shape[1:])
        data = data.to(dtype) if data.is_floating_point() else data
    else:
        event_shape = (args.dim,)
        data = None
    dim = math.prod(event_shape)
    full = not args.diagonal
    gm = GaussianMixture.random(dim, args.components, seed=args.seed, full=full, event_shape=event_shape)
    if data is None:
        data = gm.sample(args.n, generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
    score = gm.score_fn(sde)
    kwargs = dict(
        divergence=args.divergence,
        probes=args.probes,
        probe=args.probe,
        solver=args.solver,
        rtol=args.rtol,
        atol=args.atol,
        t_eps=args.t_eps,
    )

    def fn(x: torch.Tensor, generator: torch.Generator) -> dict:
        # the real ODE likelihood, plus the exact prior gap log p_T - log N(0, prior_std^2 I) at its latent: the
        # estimate misses it by construction (p_T is not exactly the prior), so it separates solver error from it
        res = _import_log_likelihood()(score, x, sde, generator=generator, **kwargs)
        z = res.latent.to(torch.float64)
        out = {f.name: getattr(res, f.name) for f in dataclasses.fields(res)} if dataclasses.is_dataclass(res) else {}
        out = {k: v for k, v in out.items() if torch.is_tensor(v) and v.shape == (x.shape[0],)}
        out.update(log_prob=res.log_prob, nfe=res.nfe, prior_gap=gm.log_prob(z, sde.T, sde) - sde.prior_log_prob(z))
        return out

    model_id = (
        f"GaussianMixture.random(dim={dim}, components={args.components}, seed={args.seed}, full={full}, "
        f"event_shape={event_shape}); {sde!r}; log_likelihood("
        + ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        + ")"
    )
    we_initialised = _maybe_init_distributed()
    try:
        summary = evaluate_dataset(
            data,
            args.out_dir,
            fn=fn,
            batch_size=args.batch_size,
            repeats=args.repeats,
            seed=args.seed,
            num_levels=num_levels,
            data_range=tuple(args.data_range),
            dtype=torch.float64 if args.float64 else None,  # integer levels are dequantized in float64 too
            device=args.device,
            model_id=model_id,
            progress=not args.quiet,
        )
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return 0
        rec = read_records(args.out_dir)
        N = summary.count
        exact = []
        for r in range(summary.repeats):
            if num_levels is None:
                x = data
            else:
                x = dequantized_samples(data, range(N), r, args.seed, None, args.data_range, num_levels=num_levels)
            exact.append(gm.log_prob(x.to(torch.float64), args.t_eps, sde))
        exact = torch.cat(exact)
        err = rec["log_prob"] - exact
        solver_err = err + rec["prior_gap"]

        def stats(e: torch.Tensor) -> str:
            return (
                f"mean {float(e.mean()):+.2e}, mean |err| {float(e.abs().mean()):.2e}, "
                f"max |err| {float(e.abs().max()):.2e}"
            )

        print(
            f"{args.sde.upper()} SDE, {args.components}-component Gaussian mixture in {dim} dims, {N} samples x "
            f"{summary.repeats} repeats, {args.divergence} divergence ({args.probes} probe(s)), {args.solver} "
            f"rtol={args.rtol:g} atol={args.atol:g}, t_eps={args.t_eps:g}"
        )
        print(
            f"log p_t_eps  estimate {summary.mean_log_prob:.5f} +- {summary.log_prob_std_error:.5f} nats, "
            f"exact {float(exact.mean()):.5f}"
        )
        print(f"  error per sample:                          {stats(err)}")
        print(f"  of which prior mismatch (exact, -prior_gap): mean {-float(rec['prior_gap'].mean()):+.2e}")
        print(f"  error without it (solver + estimator):     {stats(solver_err)}")
        nfe = summary.mean_nfe
        lo, hi = (float(v) for v in args.data_range)
        quant = "" if num_levels is None else f" ({num_levels}-level data in [{lo:g}, {hi:g}])"
        print(
            f"bits/dim {summary.mean_bpd:.5f} +- {summary.bpd_std_error:.5f}{quant}   "
            f"mean NFE {'n/a' if nfe is None else f'{nfe:.1f}'}   results: {summary.path}"
        )
        return 0
    finally:
        if we_initialised:
            torch.distributed.destroy_process_group()


__all__ = [
    "EvalSummary",
    "add_likelihood_args",
    "cmd_likelihood",
    "data_fingerprint",
    "dequantized_samples",
    "derive_seed",
    "encode_record",
    "decode_record",
    "evaluate_dataset",
    "likelihood_fn",
    "read_records",
    "record_path",
    "resolve_levels",
]
