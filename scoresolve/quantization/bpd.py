"""Bits per dimension of a density on dequantized data: the one `bits_per_dim`, the importance-weighted bound, and
the one dequantized bits/dim of a likelihood function over repeated dequantizations (`dequantized_bpd`).

Bits per dimension
------------------
Level i of L-level data in (lo, hi) owns a bin of width Delta = (hi - lo) / L (`scoresolve.quantization.levels`).
A continuous density p defines the discrete model P(i) = integral of p over bin i. With u drawn from a density
q(u | i) on the unit cube (uniform: log q = 0; `scoresolve.quantization.dequantizers`), Jensen gives

    -log2 P(i) / D  <=  E_q[ -log p(y) + log q(u | i) ] / (D ln 2) + log2(L / (hi - lo)),

the reported bits/dim: ``-(log p - log q) / (D ln 2)`` plus the offset ``-log2 Delta = log2(L / (hi - lo))``: +7
for 8-bit data in [-1, 1], +8 for [0, 1] (score_sde writes it ``7 - inverse_scaler(-1)``), log2(8.5) = 3.087 for
the 17-level digits in [-1, 1]. With a density constant on every bin and uniform q the bound is an equality; a
uniform density on the cube, log p = -D log(hi - lo), gives exactly log2 L bits/dim. Without levels (continuous
data) there is no offset.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from .._utils import check_count
from .levels import grid_levels, grid_name, levels_offset, resolve_levels

if TYPE_CHECKING:
    from .dequantizers import Dequantizer

Range = Sequence[float]


class _DefaultBits(int):
    """The default ``bits=8``, told apart from an explicit 8 so that ``num_levels`` may replace it."""


DEFAULT_BITS = _DefaultBits(8)


def data_levels(bits: int | None, num_levels: int | None, data_range: Range = (-1.0, 1.0)) -> int | None:
    """L from the ``bits`` / ``num_levels`` pair of `bits_per_dim` and `dequantized_bpd`: ``num_levels`` replaces
    the default ``bits=8``; both given explicitly must agree (`resolve_levels`); None: continuous data."""
    if num_levels is not None and isinstance(bits, _DefaultBits):
        bits = None
    return resolve_levels(bits, num_levels, data_range)


def bits_per_dim(
    log_prob: torch.Tensor | float,
    num_dims: int,
    bits: int | None = DEFAULT_BITS,
    data_range: Range = (-1.0, 1.0),
    *,
    num_levels: int | None = None,
    log_q: torch.Tensor | float = 0.0,
) -> torch.Tensor | float:
    """Bits per dimension -(log p - log q) / (D ln 2) + log2(L / (hi - lo)) of a density on dequantized data.

    Args:
        log_prob: log p(y) in nats (a tensor of any shape, or a float; the result has the same kind).
        num_dims: D, the dimensions of one sample.
        bits: k of k-bit data (L = 2^k; default 8), or None with no ``num_levels``: a continuous density, no offset.
        data_range: (lo, hi) of the data.
        num_levels: L itself (e.g. 17 for the digits); replaces the default ``bits``.
        log_q: log q(u | i) in u-space (nats) of a non-uniform dequantizer, broadcastable to ``log_prob``: the
            variational bound (0: uniform dequantization).
    """
    if isinstance(num_dims, bool) or int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    L = data_levels(bits, num_levels, data_range)
    offset = 0.0 if L is None else levels_offset(L, data_range)
    return -(log_prob - log_q) / (int(num_dims) * math.log(2)) + offset


def importance_weighted_bits_per_dim(
    log_prob: torch.Tensor, log_q: torch.Tensor, num_dims: int, num_levels: int, data_range: Range = (-1.0, 1.0)
) -> torch.Tensor:
    """The importance-weighted bound -[log (1/n) sum_k p(y_k) / q(u_k | i)] / (D ln 2) + log2(L / (hi - lo)).

    Args:
        log_prob: ``[n, B]`` log p(y_k) (nats) of n dequantizations of each of B samples.
        log_q: ``[n, B]`` their log q(u_k | i) in u-space (nats).
        num_dims: D.
        num_levels: L.
        data_range: (lo, hi) of the data.
    Returns:
        ``[B]`` bits/dim; for n = 1 the one-draw bound, and never above the mean of the n one-draw bounds. A bound
        only for exact log p: Hutchinson noise makes the log-mean-exp reward the noise.
    """
    lw = (log_prob - log_q).to(torch.float64)
    if lw.ndim != 2:
        raise ValueError(f"log_prob and log_q must have shape [n, B], got {tuple(lw.shape)}")
    n = lw.shape[0]
    return bits_per_dim(torch.logsumexp(lw, 0) - math.log(n), num_dims, None, data_range, num_levels=num_levels)


def _log_prob_and_nfe(out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.is_tensor(out):
        return out, None
    if isinstance(out, Mapping) and "log_prob" in out:
        return out["log_prob"], out.get("nfe")
    if not torch.is_tensor(getattr(out, "log_prob", None)):
        raise TypeError(f"log_likelihood_fn must return a tensor of log-probabilities, a mapping with 'log_prob' or a "
                        f"result with a .log_prob tensor (a LikelihoodResult), got {type(out).__name__}")
    return out.log_prob, getattr(out, "nfe", None)


@dataclass(frozen=True)
class DequantizedBPD:
    """Bits/dim of a batch over dequantization repeats (`dequantized_bpd`).

    Attributes:
        bpd: ``[B]`` per-sample bits/dim, mean over repeats (with a non-uniform dequantizer: the variational bound).
        log_prob: ``[B]`` per-sample log-density (nats) of the dequantized data, mean over repeats.
        bpd_repeats: ``[R, B]`` every repeat's bits/dim.
        mean: mean bits/dim over samples and repeats.
        std_error: standard error of ``mean``: std of the per-sample means over sqrt(B) (samples as i.i.d. units,
            which includes the dequantization and estimator noise); for B = 1 the spread over repeats,
            std / sqrt(R); NaN if B = R = 1.
        sample_std_error: ``[B]`` standard error over repeats of each sample's bits/dim (None if R = 1).
        log_q_mean: the mean log q(u | i) (nats; 0 for uniform dequantization).
        iw_bpd: for R > 1, ``[B]`` each sample's importance-weighted bound over its R draws (tighter than ``bpd``;
            a bound only with exact log p, e.g. ``divergence="exact"``); None for R = 1.
        iw_mean, iw_std_error: its mean and standard error over samples (None for R = 1).
        nfe_mean: mean network evaluations per sample, when the likelihood function reports ``nfe`` (else None).
        seconds: wall-clock time of the whole computation.
    """

    bpd: torch.Tensor
    log_prob: torch.Tensor
    bpd_repeats: torch.Tensor
    mean: float
    std_error: float
    sample_std_error: torch.Tensor | None
    log_q_mean: float = 0.0
    iw_bpd: torch.Tensor | None = None
    iw_mean: float | None = None
    iw_std_error: float | None = None
    nfe_mean: float | None = None
    seconds: float = 0.0


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std()) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")


def dequantized_bpd(
    log_likelihood_fn: Callable[[torch.Tensor, torch.Generator | None], Any],
    x: torch.Tensor,
    repeats: int = 1,
    bits: int | None = DEFAULT_BITS,
    data_range: Range = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    *,
    num_levels: int | None = None,
    dequantizer: Dequantizer | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
) -> DequantizedBPD:
    """Bits/dim of quantized data ``x`` averaged over ``repeats`` fresh dequantizations.

    Args:
        log_likelihood_fn: ``fn(y, generator)`` -> log p(y) in nats of a dequantized batch y: a ``[b]`` tensor, a
            mapping with key ``"log_prob"`` or an object with a ``log_prob`` attribute (and optionally ``nfe``),
            e.g. ``lambda y, g: log_likelihood(score, sde, y, generator=g)``.
        x: ``[N, ...]`` data on the grid of L levels in ``data_range`` (or integer levels).
        repeats: R, dequantization draws per sample; with R > 1 the result holds the importance-weighted bound.
        bits: k of k-bit data, L = 2^k (default 8).
        num_levels: L itself (e.g. 17 for the digits); replaces the default ``bits``.
        data_range: (lo, hi) of the data.
        generator: with ``seed=None``, the one source of every draw: repeat r, batch b draws its dequantization
            from it and then calls ``fn`` with it (for Hutchinson probes), in that order.
        dequantizer: a [`Dequantizer`][scoresolve.quantization.Dequantizer] of the same L and data_range (default:
            uniform); its log q(u | i) is subtracted from log p (the variational bound).
        batch_size: samples per call of ``fn`` (None: all N at once).
        seed: instead of ``generator``: repeat r, batch b uses a generator seeded with ``seed + 1000 r + b``.
    """
    t0 = time.perf_counter()
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape [batch, ...] with at least 2 dims, got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"x holds no samples (a tensor of shape {list(x.shape)}): there are no bits/dim to average")
    if seed is not None and generator is not None:
        raise ValueError("give generator or seed, not both")
    L = data_levels(bits, num_levels, data_range)
    if L is None:
        raise ValueError("dequantized_bpd needs the data's quantisation: give bits or num_levels")
    from .dequantizers import UniformDequantizer

    if dequantizer is None:
        dequantizer = UniformDequantizer(L, data_range)
    elif dequantizer.num_levels != L or tuple(dequantizer.data_range) != tuple(float(v) for v in data_range):
        raise ValueError(f"the dequantizer is for {dequantizer.num_levels} levels in {dequantizer.data_range}, the "
                         f"data have {L} levels in {tuple(data_range)}")
    grid_levels(x, L, data_range, grid_name(L))  # validate once, before any (expensive) likelihood call
    N, D = x.shape[0], x[0].numel()
    size = N if batch_size is None else check_count(batch_size, "batch_size")
    lp_rows, lq_rows, nfes = [], [], []
    for r in range(int(repeats)):
        lp_row, lq_row = [], []
        for b, start in enumerate(range(0, N, size)):
            g = generator if seed is None else torch.Generator().manual_seed(seed + 1000 * r + b)
            y, log_q = dequantizer.sample(x[start : start + size], g)
            lp, nfe = _log_prob_and_nfe(log_likelihood_fn(y, g))
            lp = lp.detach().to(torch.float64).flatten().cpu()
            if lp.numel() != y.shape[0]:
                raise ValueError(f"log_likelihood_fn returned {lp.numel()} values for a batch of {y.shape[0]}")
            bad = (~torch.isfinite(lp)).nonzero().flatten()
            if bad.numel():
                raise ValueError(f"log_likelihood_fn returned non-finite log-probabilities for {bad.numel()} of "
                                 f"{lp.numel()} samples (rows {(bad + start).tolist()[:8]} of x, repeat {r})")
            lp_row.append(lp)
            lq_row.append(log_q.detach().to(torch.float64).cpu())
            if nfe is not None:
                nfes.append(torch.as_tensor(nfe, dtype=torch.float64).flatten().cpu())
        lp_rows.append(torch.cat(lp_row))
        lq_rows.append(torch.cat(lq_row))
    lp, lq = torch.stack(lp_rows), torch.stack(lq_rows)  # [R, N]
    bpd = bits_per_dim(lp, D, None, data_range, num_levels=L, log_q=lq)
    per_sample = bpd.mean(0)
    R, B = bpd.shape
    sample_se = bpd.std(0, unbiased=True) / math.sqrt(R) if R > 1 else None
    if B > 1:
        se = float(per_sample.std(unbiased=True)) / math.sqrt(B)
    elif R > 1:
        se = float(sample_se[0])
    else:
        se = float("nan")
    iw = iw_mean = iw_se = None
    if R > 1:
        iw = importance_weighted_bits_per_dim(lp, lq, D, L, data_range)
        iw_mean, iw_se = _mean_se(iw)
    return DequantizedBPD(
        bpd=per_sample, log_prob=lp.mean(0), bpd_repeats=bpd, mean=float(per_sample.mean()), std_error=se,
        sample_std_error=sample_se, log_q_mean=float(lq.mean()), iw_bpd=iw, iw_mean=iw_mean, iw_std_error=iw_se,
        nfe_mean=float(torch.cat(nfes).mean()) if nfes else None, seconds=time.perf_counter() - t0)
