"""`evaluate_dataset`: the resumable, sharded loop over a dataset's (repeat, batch) units, and its summary."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from .._utils import check_count
from ..quantization.bpd import bits_per_dim
from ..quantization.levels import grid_levels, grid_name, pow2_bits, resolve_levels
from .distributed import resolve_rank, wait_complete
from .inputs import batch, dequantized, dequantized_with, derive_seed, effective_dequantizer, item
from .manifest import (
    FORMAT,
    MANIFEST,
    RESULTS,
    ResumeError,
    callable_id,
    check_manifest,
    data_fingerprint,
    model_config,
    model_fingerprint,
    run_identity,
)
from .records import (
    RankLock,
    as_columns,
    atomic_write,
    encode_record,
    fsync_dir,
    read_all,
    record_files,
    record_path,
    repair,
    same_value,
    scan_file,
)

_RESERVED = ("i", "r", "bpd", "run")

BatchFn = Callable[[torch.Tensor, torch.Generator], Any]

if TYPE_CHECKING:
    from ..quantization.dequantizers import Dequantizer


def likelihood_fn(score: Callable, sde: Any, **likelihood_kwargs: Any) -> BatchFn:
    """The default per-batch function: ``fn(x, generator) = log_likelihood(score, sde, x, generator=..., **kw)``."""
    if "generator" in likelihood_kwargs:
        raise ValueError("the generator is supplied per batch by evaluate_dataset; do not pass one")

    def fn(x: torch.Tensor, generator: torch.Generator) -> Any:
        from ..likelihood import log_likelihood  # on first use: the evaluation loop does not need the solvers

        return log_likelihood(score, sde, x, generator=generator, **likelihood_kwargs)

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
        mean_log_q: with a non-uniform ``dequantizer``: the mean log q(u | i) (nats, u-space) over all records, the
            amount subtracted from ``mean_log_prob`` in ``mean_bpd`` (None otherwise).
        iw_bpd: with a non-uniform ``dequantizer`` and ``repeats`` > 1: the mean over samples of the
            importance-weighted bound over each sample's repeats,
            [`importance_weighted_bits_per_dim`][scoresolve.quantization.importance_weighted_bits_per_dim]
            (never above ``mean_bpd``; None otherwise). A bound only with exact log p (exact divergence): Hutchinson
            probe noise in log p biases it low.
        iw_bpd_std_error: its standard error over samples (NaN for N = 1, None without ``iw_bpd``).
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
    mean_log_q: float | None = None
    iw_bpd: float | None = None
    iw_bpd_std_error: float | None = None

    def to_dict(self) -> dict:
        """The fields as a dict; the dequantizer fields only when set (so uniform runs keep their results.json)."""
        d = dataclasses.asdict(self)
        for k in _DEQUANTIZER_FIELDS:
            if d[k] is None:
                del d[k]
        return d


_DEQUANTIZER_FIELDS = ("mean_log_q", "iw_bpd", "iw_bpd_std_error")


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
    recs = read_all(out_dir, num_samples, repeats)
    return as_columns([recs[k] for k in sorted(recs, key=lambda k: (k[1], k[0]))])


def _summarize(
    recs: list[dict], num_samples: int, repeats: int, num_dims: int, path: str,
    levels: tuple[int, Sequence[float]] | None = None,
) -> EvalSummary:
    """The summary of all records (sorted by repeat, then index); ``levels`` = (L, data_range) of a run with a
    non-uniform dequantizer, whose records carry ``log_q``."""
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
    extra: dict[str, Any] = {}
    if levels is not None:
        from ..quantization.bpd import importance_weighted_bits_per_dim

        lq = torch.tensor([r["log_q"] for r in recs], dtype=torch.float64).reshape(repeats, num_samples)
        extra["mean_log_q"] = float(lq.mean())
        if repeats > 1:
            iw = importance_weighted_bits_per_dim(lp, lq, num_dims, levels[0], levels[1])
            extra["iw_bpd"] = float(iw.mean())
            extra["iw_bpd_std_error"] = se(iw[None])
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
        **extra,
    )


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
    dequantizer: "Dequantizer | None" = None,
    **likelihood_kwargs: Any,
) -> EvalSummary:
    """Log-likelihood (and bits/dim) of every sample of a dataset, resumable and sharded (see
    [`scoresolve.evaluation`][scoresolve.evaluation]).

    Args:
        data: a tensor ``[N, ...]`` or a map-style dataset (``len`` and ``[i]``) whose items are tensors or tuples
            ``(tensor, label, ...)``.
        out_dir: directory of the manifest, the per-rank record files and ``results.json``; created if needed.
            Resuming is automatic: an existing run there continues where it stopped. While a rank runs it holds a
            lock on its own lock file there: a second run of the same rank in the same ``out_dir`` is an error.
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
            and its bits/dim is -log p / (D ln 2) + log2(L / (hi - lo)) (``scoresolve.quantization``,
            ``scoresolve.data``; L = 2^k gives exactly the numbers of ``bits=k``). Both None (default):
            the data are evaluated as they are and bits/dim is plain -log p / (D ln 2). L is stored in the
            manifest: resuming with another L is an error. ``dequantizer`` replaces the uniform u.
        data_range: (lo, hi) of the data.
        dtype: floating dtype of the batches passed to ``fn``: floating data are cast to it, integer levels are
            dequantized in it (default: floating data keep theirs, integer data take ``torch.get_default_dtype()``).
            Stored in the manifest.
        device: where batches go before ``fn`` (dequantization happens on the CPU first). On the CPU the
            manifest stores torch's thread count (``torch.get_num_threads()``): the rounding of a CPU solve, and the
            steps of an adaptive one, depend on it (measured: log p of the digits model differs by up to 0.4 nats
            between 1 and 2 threads at rtol 1e-3), so resuming with another thread count is refused
            (``torch.set_num_threads`` to the stored count resumes).
        model_id: a string naming the model, stored in the manifest and checked on resume (the default ``fn``
            records the score's name, with a checksum of its weights for a torch module, and the SDE).
            Independently, the manifest stores ``model_fingerprint``: a hash of the parameters and buffers of the
            torch modules that ``score`` (default ``fn``) or ``fn`` reaches (see
            [`model_fingerprint`][scoresolve.fingerprint.model_fingerprint]); resuming with another model
            is an error naming both fingerprints (manifests from before fingerprints resume unchecked). The same
            weights read another way are another model: ``model_config`` stores the prediction, time convention,
            ``num_timesteps``, ``net_kwargs`` and process of every [`ScoreModel`][scoresolve.ScoreModel] reached
            ([`model_config`][scoresolve.fingerprint.model_config]), checked on resume.
        progress: a tqdm bar of this rank's samples (rank 0 only).
        rank: this process's shard (default: from ``torch.distributed`` when initialised, else 0).
        world_size: number of shards (default: from ``torch.distributed`` when initialised, else 1).
        wait_timeout: seconds to wait for the other ranks' records at the end (default: forever).
        poll_interval: longest pause between reads of the record files while waiting.
        dequantizer: q(u | i) of the position inside each bin, a
            [`Dequantizer`][scoresolve.quantization.Dequantizer] for the data's L levels in ``data_range`` (needs
            ``bits`` or ``num_levels``). None (default) or a plain ``UniformDequantizer``: uniform u as described
            above (the same numbers, records and manifest). Otherwise sample i of repeat r is dequantized to
            lo + Delta (i + u), u ~ q(u | i) drawn with a CPU generator seeded with
            ``derive_seed("dequant", seed, r, i)``, one sample at a time (independent of batch size, sharding and
            restarts; keep the dequantizer on the CPU); its record holds ``log_q`` (u-space, nats) and ``bpd`` is the
            variational bound (-log p + log q) / (D ln 2) + log2(L / (hi - lo))
            ([`bits_per_dim`][scoresolve.quantization.bits_per_dim] with ``log_q``); the summary adds
            ``mean_log_q`` and, for ``repeats`` > 1, the importance-weighted bound ``iw_bpd`` (valid with exact
            divergences only). ``dequantizer.describe()`` (kind, settings, a hash of a learned q's weights) is
            stored in the manifest: resuming with another dequantizer is an error.
            [`dequantized_samples`][scoresolve.evaluation.dequantized_samples] with the same dequantizer
            reproduces the inputs.

    Returns:
        The [`EvalSummary`][scoresolve.EvalSummary] of all N x repeats records (log p in nats, bits/dim per
        dimension).

    Raises:
        ValueError: invalid settings (among them ``bits`` and ``num_levels`` that disagree, or L < 2; see
            ``scoresolve.quantization.resolve_levels``; a dequantizer for other levels or continuous data), data
            off the declared grid, or an ``out_dir`` holding a run with other settings, another dequantizer or
            another model (`ResumeError`, a ValueError; also when ``out_dir`` holds records of another run, which
            every record's ``run`` identity tells even after ``manifest.json`` was deleted).
        RunLockedError: (a RuntimeError) another live run is evaluating the same rank in ``out_dir``.
    """
    rank, world_size, barrier = resolve_rank(rank, world_size)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    batch_size, repeats, seed = int(batch_size), int(repeats), check_count(seed, "seed", minimum=None)
    if wait_timeout is not None and not (isinstance(wait_timeout, (int, float)) and wait_timeout >= 0):
        raise ValueError(f"wait_timeout must be None (wait forever) or a number of seconds >= 0, got {wait_timeout!r}")
    if not (isinstance(poll_interval, (int, float)) and math.isfinite(poll_interval) and poll_interval > 0):
        raise ValueError(f"poll_interval must be a finite number of seconds > 0 (0 would spin while waiting for "
                         f"the other ranks), got {poll_interval!r}")
    if fn is None:
        if score is None or sde is None:
            raise ValueError("give either fn, or score and sde for the default log_likelihood")
        fingerprint, config = model_fingerprint(score), model_config(score)
        fn = likelihood_fn(score, sde, **likelihood_kwargs)
        likelihood = {
            "score": callable_id(score),
            "sde": repr(sde),
            "kwargs": {k: repr(v) for k, v in sorted(likelihood_kwargs.items())},
        }
    else:
        if score is not None or sde is not None or likelihood_kwargs:
            extra = sorted(likelihood_kwargs) + [k for k, v in (("score", score), ("sde", sde)) if v is not None]
            raise ValueError(f"with an explicit fn these arguments would be ignored: {extra}")
        fingerprint, config = model_fingerprint(fn), model_config(fn)
        likelihood = None
    N = len(data)
    if N == 0:
        raise ValueError("the dataset is empty")
    first = item(data, 0)
    if first.ndim == 0:
        raise ValueError("dataset items must be tensors with at least one dimension (use shape [1] for scalars)")
    L = resolve_levels(bits, num_levels, data_range)
    if L is None and not first.is_floating_point():
        raise ValueError(
            f"the data are {first.dtype}: give bits or num_levels (and data_range) to dequantize integer data"
        )
    if L is not None:
        grid_levels(first, L, data_range, grid_name(L))  # fail early on the wrong bits / num_levels / data_range
    dq = effective_dequantizer(dequantizer, L, data_range)
    if dq is not None:
        dequantized_with(dq, first[None], [0], 0, seed, dtype)  # fail early, e.g. on a q for another sample shape
    manifest = {
        "format": FORMAT,
        "num_samples": N,
        "sample_shape": list(first.shape),
        "repeats": repeats,
        "seed": seed,
        # L is what the numbers depend on; bits is k for L = 2^k (else None), as runs before num_levels stored it
        "bits": None if L is None else pow2_bits(L),
        "num_levels": L,
        "data_range": None if L is None else [float(v) for v in data_range],
        "dtype": None if dtype is None else str(dtype),
        # torch's intra-op threads change a CPU solve's rounding, and an adaptive solve's steps with it: part of the
        # identity (None off the CPU)
        "threads": torch.get_num_threads() if _on_cpu(device, first) else None,
        "data_fingerprint": data_fingerprint(data),
        "likelihood": likelihood,
        "model_id": model_id,
        "model_fingerprint": fingerprint,
        "model_config": config,
        "batch_size": batch_size,
        "world_size": world_size,
        "fn": getattr(fn, "__qualname__", type(fn).__qualname__),
    }
    if dq is not None:  # absent for uniform noise: the manifests of uniform runs are unchanged
        manifest["dequantizer"] = dq.describe()
    os.makedirs(out_dir, exist_ok=True)
    with RankLock(out_dir, rank):
        created, idents = check_manifest(out_dir, manifest, rank, data)
        _compute(data, out_dir, fn, manifest, rank, world_size, L, data_range, dtype, device, progress, dq, created,
                 idents)
        # gather: wait for every pair on disk (no collective: ranks may finish far apart), summarise
        allrec = wait_complete(out_dir, N, repeats, world_size, wait_timeout, poll_interval)
    recs = [allrec[(i, r)] for r in range(repeats) for i in range(N)]
    results = os.path.join(out_dir, RESULTS)
    summary = _summarize(recs, N, repeats, first.numel(), os.path.abspath(results),
                         None if dq is None else (L, data_range))
    if rank == 0:
        body = {
            "format": FORMAT,
            "summary": summary.to_dict(),
            "manifest": manifest,
            "records": {k: v.tolist() for k, v in as_columns(recs).items()},
        }
        atomic_write(results, (json.dumps(body, allow_nan=True) + "\n").encode())
    if barrier:
        torch.distributed.barrier()
    return summary


def _on_cpu(device: Any, first: torch.Tensor) -> bool:
    return (first.device if device is None else torch.device(device)).type == "cpu"


def _compute(
    data: Any, out_dir: str, fn: BatchFn, manifest: dict, rank: int, world_size: int, L: int | None,
    data_range: Sequence[float], dtype: torch.dtype | None, device: Any, progress: bool, dq: "Dequantizer | None",
    new_manifest: bool = False, accepted: frozenset[int] = frozenset(),
) -> None:
    """Compute and append this rank's missing records (the caller holds the rank's lock). Records of another run
    (their ``run`` identity is neither this run's nor one of ``accepted``, the identities `check_manifest` found
    for the stored manifest; or, under a manifest written just now, records without one) are refused with
    `ResumeError`."""
    N, repeats, seed, batch_size = (manifest[k] for k in ("num_samples", "repeats", "seed", "batch_size"))
    ident = run_identity(manifest)
    accepted = accepted | {ident}
    num_dims = math.prod(manifest["sample_shape"])
    # what is done: read every rank's file; repair our own (and, on rank 0, files of ranks that no longer exist)
    done: dict[tuple[int, int], dict] = {}
    for r_file, path in record_files(out_dir):
        good, bad, torn = scan_file(path, N, repeats)
        if (bad or torn) and (r_file == rank or (rank == 0 and r_file >= world_size)):
            repair(path, good, bad, torn)
        for _, rec in good:
            done.setdefault((rec["i"], rec["r"]), rec)
    foreign = sum(1 for rec in done.values() if rec.get("run", None if new_manifest else ident) not in accepted)
    if foreign:
        raise ResumeError(
            f"cannot resume in {out_dir!r}: {foreign} of its {len(done)} records were computed by another run (other "
            "settings, data or model" + (", and its manifest.json was missing" if new_manifest else "")
            + "); use another out_dir, or restore the original run's settings and manifest"
        )

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
                fsync_dir(out_dir)
            for r, b in todo:
                idx = span(b)
                x = batch(data, idx.start, idx.stop)
                log_q = None
                if dq is not None:
                    x, log_q = dequantized_with(dq, x, idx, r, seed, dtype)
                elif L is not None:
                    x = dequantized(x, idx, r, seed, L, data_range, dtype)
                elif dtype is not None:
                    x = x.to(dtype)
                if device is not None:
                    x = x.to(device)
                gen = torch.Generator(device=x.device).manual_seed(derive_seed("batch", seed, r, idx.start, idx.stop))
                cols = _columns(fn(x, gen), len(idx))
                lp = torch.tensor(cols["log_prob"], dtype=torch.float64)
                if log_q is not None:
                    if "log_q" in cols:
                        raise ValueError("the per-batch function returned 'log_q', which a run with a dequantizer "
                                         "records itself")
                    cols["log_q"] = log_q.tolist()
                    lp = lp - log_q
                cols["bpd"] = bits_per_dim(lp, num_dims, None, data_range, num_levels=L).tolist()
                lines = []
                for j, i in enumerate(idx):
                    rec = {"i": i, "r": r, "log_prob": cols["log_prob"][j], "bpd": cols["bpd"][j], "run": ident}
                    rec.update({k: v[j] for k, v in cols.items() if k not in rec})
                    old = done.get((i, r))
                    if old is None:
                        lines.append(encode_record(rec))
                        done[(i, r)] = rec
                    elif not mismatch_warned and any(not same_value(old[k], v) for k, v in rec.items() if k in old):
                        mismatch_warned = True
                        warnings.warn(
                            f"recomputing batch {idx.start}:{idx.stop} (repeat {r}) gave values that differ from the "
                            "stored records: the per-batch function is not deterministic; stored values are kept",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(lines))
    finally:
        if bar is not None:
            bar.close()
