"""Quantized data on a grid of L levels, and their uniform dequantization.

Convention (the one of score_sde and DDPM, for any number of levels L; k-bit data are L = 2^k)
--------------------------------------------------------------------------------------------
L-level data hold integer levels i in {0, ..., L - 1}. Scaled to ``data_range = (lo, hi)`` they sit on the grid

    x = lo + (hi - lo) * i / (L - 1)       (DDPM: x = i / 127.5 - 1; score_sde: 2 (i / 255) - 1; digits: 2 i / 16 - 1)

so that the lowest level is lo and the highest is hi. Uniform dequantization does *not* jitter x around that grid
point; it maps level i to the bin [i, i + 1) of a grid with L bins that tile [lo, hi) exactly:

    y = lo + (hi - lo) * (i + u) / L,   u ~ U[0, 1)^D.

This is score_sde's ``img = (U + 255 * img) / 256`` on data in [0, 1] (``img = i / 255``), followed by its scaler
``2 img - 1`` for centred data. Bins have width Delta = (hi - lo) / L and volume Delta^D; the bits/dim offset
-log2 Delta = log2(L / (hi - lo)) is `levels_offset` (see `scoresolve.quantization.bpd`).
"""

from __future__ import annotations

import math
from typing import Sequence

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


def from_levels(v: torch.Tensor, num_levels: int, data_range: Range = (-1.0, 1.0),
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Grid values lo + (hi - lo) v / (L - 1) of integer levels v."""
    lo, hi = check_levels_range(num_levels, data_range)
    return (lo + (hi - lo) * v.to(torch.float64) / (int(num_levels) - 1)).to(dtype)


def quantize(y: torch.Tensor, num_levels: int, data_range: Range = (-1.0, 1.0)) -> torch.Tensor:
    """The level of the bin holding each value of continuous data y (clamped), as grid values (the inverse of
    [`dequantize`][scoresolve.quantization.dequantize]: turns samples of a model trained on dequantized data into
    data-like images)."""
    lo, hi = check_levels_range(num_levels, data_range)
    lv = torch.floor((y.double() - lo) / (hi - lo) * num_levels).clamp(0, num_levels - 1)
    return from_levels(lv, num_levels, data_range, dtype=y.dtype if y.is_floating_point() else torch.float32)


def dequantize(
    x: torch.Tensor,
    num_levels: int,
    data_range: Range = (-1.0, 1.0),
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    what: str | None = None,
) -> torch.Tensor:
    """Dequantize L-level data: level i -> lo + (hi - lo) (i + u) / L with u ~ U[0, 1) (the module's convention).
    Arguments as [`uniform_dequantize`][scoresolve.uniform_dequantize] with L = ``num_levels`` in place of 2^k;
    ``what`` names the grid in messages. The result has x's dtype if it is floating, else the given noise's, else
    ``torch.get_default_dtype()``."""
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
    return dequantize(x, 2 ** int(bits), data_range, generator, noise=noise, what=f"{int(bits)}-bit")
