"""Measurements of a trained image model: bits/dim on held-out digits and sample grids.

    scoresolve evaluate --checkpoint scoresolve/models/checkpoints/digits_vp.pt --bpd-n 200 --grid digits_samples.png

(or ``python -m scoresolve evaluate`` with the same options; the command lives in `scoresolve.cli.evaluate`).

Bits/dim: each held-out image is uniformly dequantized on its 17 levels
([`scoresolve.data.dequantize`][scoresolve.data.dequantize]), its log-density is computed with
[`scoresolve.log_likelihood`][scoresolve.log_likelihood] (probability-flow ODE, Hutchinson divergence, per-sample
adaptive dopri5) and converted with [`scoresolve.data.bits_per_dim`][scoresolve.data.bits_per_dim]
(offset log2(17 / 2)). ``dequantizer=`` (``--dequantization truncnorm|variational``, ``--iw N``) takes another
q(u | i) of `scoresolve.dequantizers` and reports the variational bound, and with several draws per image the
importance-weighted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import DIGITS_LEVELS, DIGITS_RANGE
from ..dequantizers import (
    Dequantizer,
    UniformDequantizer,
    dequantized_bits_per_dim,
    importance_weighted_bits_per_dim,
)
from ..likelihood import log_likelihood


@dataclass
class BPDResult:
    """Bits/dim of a set of images: per-image values (mean over repeats), their mean and standard error.

    With a dequantizer other than uniform the values are the variational bound E_q[-log p(y) + log q(u | i)] /
    (D ln 2) + log2(L / (hi - lo)) (`scoresolve.dequantizers`). With several repeats, ``iw_bpd`` holds each image's
    importance-weighted bound over its R draws (tighter than ``bpd``, the mean of the R one-draw bounds), ``iw_mean``
    and ``iw_std_error`` its mean and standard error (None for one repeat); it is a bound only with an exact
    divergence (``divergence="exact"``): Hutchinson noise in log p lowers it spuriously. ``log_q_mean`` is the
    mean log q(u | i) per image (nats; 0 for uniform dequantization).
    """

    bpd: torch.Tensor
    mean: float
    std_error: float
    nfe_mean: float
    seconds: float
    iw_bpd: torch.Tensor | None = None
    iw_mean: float | None = None
    iw_std_error: float | None = None
    log_q_mean: float = 0.0


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std()) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")


def dequantized_bpd(
    model,
    sde,
    x: torch.Tensor,
    *,
    num_levels: int = DIGITS_LEVELS,
    data_range: Sequence[float] = DIGITS_RANGE,
    repeats: int = 1,
    batch_size: int = 100,
    seed: int = 0,
    dequantizer: Dequantizer | None = None,
    **likelihood_kwargs,
) -> BPDResult:
    """Bits/dim of L-level grid data ``x`` under ``model``: dequantize, PF-ODE log-likelihood, add log2(L/(hi-lo)).

    Args:
        model: the score model (a [`scoresolve.ScoreModel`][scoresolve.ScoreModel] or a score function).
        sde: its forward process.
        x: ``[N, ...]`` data on the L-level grid of ``data_range`` (or integer levels).
        num_levels: L.
        data_range: (lo, hi) of the data.
        repeats: dequantization draws per image; with more than one the result also holds the importance-weighted
            bound over them (``iw_bpd``).
        batch_size: images per likelihood solve.
        seed: batch b of repeat r draws its dequantization and then its Hutchinson probes from one generator seeded
            with ``seed + 1000 r + b``.
        dequantizer: a [`Dequantizer`][scoresolve.dequantizers.Dequantizer] of the same L and data_range (default:
            uniform, the numbers of [`scoresolve.data.dequantize`][scoresolve.data.dequantize]); its log q(u | i)
            is subtracted from log p (the variational bound of `scoresolve.dequantizers`).
        **likelihood_kwargs: go to [`scoresolve.log_likelihood`][scoresolve.log_likelihood] (probes, rtol, ...).
    """
    t0 = time.perf_counter()
    if dequantizer is None:
        dequantizer = UniformDequantizer(num_levels, data_range)
    elif dequantizer.num_levels != int(num_levels) or tuple(dequantizer.data_range) != tuple(
        float(v) for v in data_range
    ):
        raise ValueError(
            f"the dequantizer is for {dequantizer.num_levels} levels in {dequantizer.data_range}, the data have "
            f"{num_levels} levels in {tuple(data_range)}"
        )
    D = x[0].numel()
    lp_rows, lq_rows, nfes = [], [], []
    for r in range(int(repeats)):
        lp_row, lq_row = [], []
        for b, start in enumerate(range(0, x.shape[0], batch_size)):
            g = torch.Generator().manual_seed(seed + 1000 * r + b)
            y, log_q = dequantizer.sample(x[start : start + batch_size], g)
            res = log_likelihood(model, sde, y, generator=g, **likelihood_kwargs)
            lp_row.append(res.log_prob.double())
            lq_row.append(log_q.double())
            nfes.append(res.nfe.double())
        lp_rows.append(torch.cat(lp_row))
        lq_rows.append(torch.cat(lq_row))
    lp, lq = torch.stack(lp_rows), torch.stack(lq_rows)  # [R, N]
    bpd = dequantized_bits_per_dim(lp, lq, D, num_levels, data_range).mean(0)
    mean, se = _mean_se(bpd)
    iw = iw_mean = iw_se = None
    if lp.shape[0] > 1:
        iw = importance_weighted_bits_per_dim(lp, lq, D, num_levels, data_range)
        iw_mean, iw_se = _mean_se(iw)
    return BPDResult(bpd, mean, se, float(torch.cat(nfes).mean()), time.perf_counter() - t0, iw, iw_mean, iw_se,
                     float(lq.mean()))


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 1, value_range: Sequence[float] = (-1.0, 1.0)):
    """A 2-D (gray) or HxWx3 array in [0, 1] tiling images ``[N, C, H, W]`` in rows of ``nrow``."""
    lo, hi = value_range
    x = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    n, c, h, w = x.shape
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def save_sample_grids(panels: Sequence[tuple[str, torch.Tensor]], path: str, nrow: int = 8) -> None:
    """Save side-by-side image grids, one titled panel per (title, images) pair, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    for ax, (title, imgs) in zip(axes[0], panels):
        ax.imshow(image_grid(imgs, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
