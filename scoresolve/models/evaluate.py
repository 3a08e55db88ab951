"""Measurements of a trained image model: bits/dim on held-out digits and sample grids.

    scoresolve evaluate --checkpoint scoresolve/models/checkpoints/digits_vp.pt --bpd-n 200 --grid digits_samples.png

(or ``python -m scoresolve.models.evaluate`` with the same options; the command lives in `scoresolve.cli.evaluate`).

Bits/dim: each held-out image is uniformly dequantized on its 17 levels
([`scoresolve.data.dequantize`][scoresolve.data.dequantize]), its log-density is computed with
[`scoresolve.log_likelihood`][scoresolve.log_likelihood] (probability-flow ODE, Hutchinson divergence, per-sample
adaptive dopri5) and converted with [`scoresolve.data.bits_per_dim`][scoresolve.data.bits_per_dim]
(offset log2(17 / 2)).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import DIGITS_LEVELS, DIGITS_RANGE, bits_per_dim, dequantize
from ..likelihood import log_likelihood


@dataclass
class BPDResult:
    """Bits/dim of a set of images: per-image values (mean over repeats), their mean and standard error."""

    bpd: torch.Tensor
    mean: float
    std_error: float
    nfe_mean: float
    seconds: float


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
    **likelihood_kwargs,
) -> BPDResult:
    """Bits/dim of L-level grid data ``x`` under ``model``: dequantize, PF-ODE log-likelihood, add log2(L/(hi-lo)).

    Batch b of repeat r draws its dequantization noise and then its Hutchinson probes from one generator seeded with
    ``seed + 1000 r + b``. ``likelihood_kwargs`` go to [`scoresolve.log_likelihood`][scoresolve.log_likelihood] (probes,
    rtol, ...).
    """
    t0 = time.perf_counter()
    D = x[0].numel()
    rows, nfes = [], []
    for r in range(int(repeats)):
        row = []
        for b, start in enumerate(range(0, x.shape[0], batch_size)):
            g = torch.Generator().manual_seed(seed + 1000 * r + b)
            y = dequantize(x[start : start + batch_size], num_levels, data_range, generator=g)
            res = log_likelihood(model, sde, y, generator=g, **likelihood_kwargs)
            row.append(bits_per_dim(res.log_prob.double(), D, num_levels, data_range))
            nfes.append(res.nfe.double())
        rows.append(torch.cat(row))
    bpd = torch.stack(rows).mean(0)
    se = float(bpd.std()) / math.sqrt(bpd.numel()) if bpd.numel() > 1 else float("nan")
    return BPDResult(bpd, float(bpd.mean()), se, float(torch.cat(nfes).mean()), time.perf_counter() - t0)


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


if __name__ == "__main__":  # python -m scoresolve.models.evaluate: the `scoresolve evaluate` command
    from ..cli.evaluate import main

    sys.exit(main())
