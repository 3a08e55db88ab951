"""Uniform dequantization of k-bit data and bits per dimension.

Convention (the one of score_sde and DDPM)
------------------------------------------
k-bit data hold integer levels i in {0, ..., 2^k - 1}. Scaled to ``data_range = (lo, hi)`` they sit on the grid

    x = lo + (hi - lo) * i / (2^k - 1)                      (DDPM: x = i / 127.5 - 1; score_sde: 2 (i / 255) - 1)

so that the lowest level is lo and the highest is hi. Uniform dequantization does *not* jitter x around that grid
point; it maps level i to the bin [i, i + 1) of a grid with 2^k bins that tile [lo, hi) exactly:

    y = lo + (hi - lo) * (i + u) / 2^k,   u ~ U[0, 1)^D.

This is score_sde's ``img = (U + 255 * img) / 256`` on data in [0, 1] (``img = i / 255``), followed by its scaler
``2 img - 1`` for centred data. Bins have width Delta = (hi - lo) / 2^k and volume Delta^D.

Bits per dimension
------------------
A continuous density p on [lo, hi]^D defines the discrete model P(i) = integral of p over bin i
= Delta^D E_u[p(y_i(u))] >= Delta^D exp(E_u[log p(y_i(u))]) (Jensen). Hence

    -log2 P(i) / D  <=  E_u[ -log p(y) / (D ln 2) ] + log2(2^k / (hi - lo)),

and the right-hand side (estimated with a few draws of u) is the reported bits/dim: ``-log p / (D ln 2)`` plus the
offset ``-log2 Delta = log2(2^k / (hi - lo))``: +7 for 8-bit data in [-1, 1], +8 for [0, 1] (score_sde writes
it ``7 - inverse_scaler(-1)``). With a density that is constant on every bin the bound is an equality; a uniform
density on the cube, log p = -D log(hi - lo), gives exactly k bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

Range = Sequence[float]


def _check_range(data_range: Range) -> tuple[float, float]:
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be finite with lo < hi, got {tuple(data_range)}")
    return lo, hi


def _check_bits_range(bits: int, data_range: Range) -> tuple[float, float]:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 32:
        raise ValueError(f"bits must be an integer in [1, 32], got {bits!r}")
    return _check_range(data_range)


def check_levels_range(num_levels: int, data_range: Range) -> tuple[float, float]:
    """Validate L-level data settings (an integer L >= 2 and a finite lo < hi); returns (lo, hi)."""
    if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    return _check_range(data_range)


def levels_offset(num_levels: int, data_range: Range = (-1.0, 1.0)) -> float:
    """The bits/dim offset log2(L / (hi - lo)) of L-level data in ``data_range``: bits/dim of the bins minus
    bits/dim of the density (-log2 of the bin width (hi - lo) / L). Computed as log2 L - log2(hi - lo), which is
    exactly k - log2(hi - lo) for L = 2^k."""
    lo, hi = check_levels_range(num_levels, data_range)
    return math.log2(int(num_levels)) - math.log2(hi - lo)


def bin_offset(bits: int | None, data_range: Range = (-1.0, 1.0)) -> float:
    """The bits/dim offset log2(2^k / (hi - lo)) of k-bit data in ``data_range`` (0 for ``bits=None``)."""
    if bits is None:
        return 0.0
    _check_bits_range(bits, data_range)
    return levels_offset(2 ** int(bits), data_range)


def levels_bits_per_dim(
    log_prob: torch.Tensor | float, num_dims: int, num_levels: int | None, data_range: Range = (-1.0, 1.0)
) -> torch.Tensor | float:
    """Bits/dim -log p / (D ln 2) + log2(L / (hi - lo)) of a density (nats) on dequantized L-level data
    (``num_levels=None``: continuous data, no offset). ``bits_per_dim`` is the case L = 2^k."""
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    offset = 0.0 if num_levels is None else levels_offset(num_levels, data_range)
    return -log_prob / (int(num_dims) * math.log(2)) + offset


def resolve_levels(bits: int | None, num_levels: int | None, data_range: Range = (-1.0, 1.0)) -> int | None:
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


def pow2_bits(num_levels: int) -> int | None:
    """k if L = 2^k with k in [1, 32] (the range of the k-bit helpers), else None."""
    k = int(num_levels).bit_length() - 1
    return k if 1 <= k <= 32 and 1 << k == num_levels else None


def grid_name(num_levels: int) -> str:
    """``"k-bit"`` for L = 2^k, else ``"L-level"``: the grid's name in messages."""
    k = pow2_bits(num_levels)
    return f"{k}-bit" if k is not None else f"{int(num_levels)}-level"


def grid_levels(x: torch.Tensor, num_levels: int, data_range: Range, what: str | None = None) -> torch.Tensor:
    """Integer levels i (int64) of L-level data: integer tensors are taken as levels, floats as lo + (hi-lo) i/(L-1).

    Raises ValueError naming the offending min/max if the data leave the declared range, or if floating data are
    not on the grid (e.g. data that were already dequantized, or a wrong ``num_levels``/``data_range``). ``what``
    names the grid in messages (default ``"L-level"``).
    """
    lo, hi = check_levels_range(num_levels, data_range)
    what = what or f"{int(num_levels)}-level"
    n_max = int(num_levels) - 1
    if not x.is_floating_point():
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"x must be a real tensor, got {x.dtype}")
        lv = x.to(torch.int64)
        if x.numel() and (int(lv.min()) < 0 or int(lv.max()) > n_max):
            raise ValueError(
                f"integer data must be {what} levels in [0, {n_max}], got min {int(lv.min())}, max {int(lv.max())}"
            )
        return lv
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values")
    scaled = (x.double() - lo) / (hi - lo) * n_max
    # float32 data carry ~eps * L levels of rounding error; anything far beyond that is off the grid
    tol = 1e-3 + 4 * torch.finfo(x.dtype).eps * (n_max + 1)
    if float(scaled.min()) < -tol or float(scaled.max()) > n_max + tol:
        raise ValueError(
            f"data lie outside the declared data_range {(lo, hi)}: min {float(x.min()):.6g}, max {float(x.max()):.6g}"
        )
    lv = torch.round(scaled)
    off = float((scaled - lv).abs().max())
    if off > tol:
        raise ValueError(
            f"data are not on the {what} grid lo + (hi - lo) i / {n_max} of data_range {(lo, hi)} (a value is "
            f"{off:.3g} levels off); already dequantized, or wrong levels/data_range?"
        )
    return lv.clamp_(0, n_max).to(torch.int64)


def dequantize_levels(
    x: torch.Tensor,
    num_levels: int,
    data_range: Range,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    what: str | None = None,
) -> torch.Tensor:
    """Dequantize L-level data: level i -> lo + (hi - lo) (i + u) / L with u ~ U[0, 1) (the module's convention
    with 2^k replaced by L). Arguments as [`uniform_dequantize`][scoresolve.uniform_dequantize]; the result has
    x's dtype if it is floating, else the given noise's, else ``torch.get_default_dtype()``."""
    lo, hi = check_levels_range(num_levels, data_range)
    lv = grid_levels(x, num_levels, data_range, what)
    if x.is_floating_point():
        dtype = x.dtype
    else:
        dtype = noise.dtype if noise is not None and noise.is_floating_point() else torch.get_default_dtype()
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    elif noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match x shape {tuple(x.shape)}")
    y = lo + (hi - lo) * ((lv.to(torch.float64) + noise.to(device=x.device, dtype=torch.float64)) / int(num_levels))
    return y.to(dtype)


def levels(x: torch.Tensor, bits: int = 8, data_range: Range = (-1.0, 1.0)) -> torch.Tensor:
    """Integer levels i (int64) of k-bit data (`grid_levels` with L = 2^k)."""
    _check_bits_range(bits, data_range)
    return grid_levels(x, 2 ** int(bits), data_range, f"{int(bits)}-bit")


def uniform_dequantize(
    x: torch.Tensor,
    bits: int = 8,
    data_range: Range = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize k-bit data: level i -> lo + (hi - lo) (i + u) / 2^k with u ~ U[0, 1) (see the module docstring).

    Args:
        x: k-bit data ``[batch, ...]`` on the grid lo + (hi - lo) i / (2^k - 1), or integer levels (uint8, ...).
        bits: k.
        data_range: (lo, hi) of the scaled data.
        generator: source of u (drawn with ``torch.rand`` in the output dtype on x's device).
        noise: u itself, shape like x, values in [0, 1) (overrides ``generator``).
    Returns a floating tensor shaped like x (x's dtype; for integer input the noise's, or the default dtype) in
    [lo, hi]: computed in float64, then rounded to the output dtype (which can land a value on its bin's upper edge).
    """
    _check_bits_range(bits, data_range)
    return dequantize_levels(x, 2 ** int(bits), data_range, generator, noise=noise, what=f"{int(bits)}-bit")


def bits_per_dim(
    log_prob: torch.Tensor | float,
    num_dims: int,
    bits: int | None = 8,
    data_range: Range = (-1.0, 1.0),
) -> torch.Tensor | float:
    """Bits per dimension -log p / (D ln 2) + log2(2^k / (hi - lo)) of a density on dequantized k-bit data.

    ``log_prob`` is in nats (a tensor or a float; the result has the same kind). The offset is the change of
    variables from the continuous density on [lo, hi]^D to the probability of bins of width (hi - lo) / 2^k: +7 for
    8-bit data in [-1, 1], +8 for [0, 1]. ``bits=None`` gives the plain bits/dim of a continuous density (no offset).
    """
    if int(num_dims) != num_dims or num_dims < 1:
        raise ValueError(f"num_dims must be a positive integer, got {num_dims!r}")
    return -log_prob / (int(num_dims) * math.log(2)) + bin_offset(bits, data_range)


def _log_prob_of(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping):
        return out["log_prob"]
    return out.log_prob


@dataclass(frozen=True)
class DequantizedBPD:
    """Bits/dim averaged over dequantization repeats.

    Attributes:
        bpd: ``[B]`` per-sample bits/dim, mean over repeats.
        log_prob: ``[B]`` per-sample log-density (nats) of the dequantized data, mean over repeats.
        bpd_repeats: ``[R, B]`` every repeat's bits/dim.
        mean: mean bits/dim over samples and repeats.
        std_error: standard error of ``mean``: std of the per-sample means over sqrt(B) (samples as i.i.d. units,
            which includes the dequantization and estimator noise); for B = 1 the spread over repeats,
            std / sqrt(R); NaN if B = R = 1.
        sample_std_error: ``[B]`` standard error over repeats of each sample's bits/dim (None if R = 1).
    """

    bpd: torch.Tensor
    log_prob: torch.Tensor
    bpd_repeats: torch.Tensor
    mean: float
    std_error: float
    sample_std_error: torch.Tensor | None


def dequantized_bpd(
    log_likelihood_fn: Callable[[torch.Tensor, torch.Generator | None], Any],
    x: torch.Tensor,
    repeats: int = 1,
    bits: int = 8,
    data_range: Range = (-1.0, 1.0),
    generator: torch.Generator | None = None,
) -> DequantizedBPD:
    """Bits/dim of k-bit data ``x`` averaged over ``repeats`` fresh uniform dequantizations.

    ``log_likelihood_fn(y, generator)`` returns log p(y) in nats for the dequantized batch y: a ``[B]`` tensor, a
    mapping with key ``"log_prob"`` or an object with a ``log_prob`` attribute (e.g.
    ``lambda y, g: log_likelihood(score, sde, y, generator=g)``). Repeat r draws its dequantization noise from
    ``generator`` and then calls the function with the same generator (for Hutchinson probes), in that order, so a
    seeded generator makes the whole computation reproducible.
    """
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape [batch, ...] with at least 2 dims, got {tuple(x.shape)}")
    lv_check = levels(x, bits, data_range)  # validate once, before any (expensive) likelihood call
    del lv_check
    D = x[0].numel()
    rows = []
    for _ in range(int(repeats)):
        y = uniform_dequantize(x, bits, data_range, generator)
        lp = _log_prob_of(log_likelihood_fn(y, generator)).detach().to(torch.float64).flatten()
        if lp.numel() != x.shape[0]:
            raise ValueError(f"log_likelihood_fn returned {lp.numel()} values for a batch of {x.shape[0]}")
        rows.append(lp.cpu())
    lp = torch.stack(rows)  # [R, B]
    bpd = bits_per_dim(lp, D, bits, data_range)
    per_sample = bpd.mean(0)
    R, B = bpd.shape
    sample_se = bpd.std(0, unbiased=True) / math.sqrt(R) if R > 1 else None
    if B > 1:
        se = float(per_sample.std(unbiased=True)) / math.sqrt(B)
    elif R > 1:
        se = float(sample_se[0])
    else:
        se = float("nan")
    return DequantizedBPD(
        bpd=per_sample,
        log_prob=lp.mean(0),
        bpd_repeats=bpd,
        mean=float(per_sample.mean()),
        std_error=se,
        sample_std_error=sample_se,
    )
