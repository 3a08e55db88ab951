"""Measurements of a trained image model: bits/dim on held-out digits and sample grids.

    python -m scoresolve.models.evaluate --checkpoint scoresolve/models/checkpoints/digits_vp.pt \\
        --bpd-n 200 --grid digits_samples.png

Bits/dim: each held-out image is uniformly dequantized on its 17 levels
([`scoresolve.data.dequantize`][scoresolve.data.dequantize]), its log-density is computed with
[`scoresolve.log_likelihood`][scoresolve.log_likelihood] (probability-flow ODE, Hutchinson divergence, per-sample
adaptive dopri5) and converted with [`scoresolve.data.bits_per_dim`][scoresolve.data.bits_per_dim]
(offset log2(17 / 2)).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..data import DIGITS_LEVELS, DIGITS_RANGE, bits_per_dim, dequantize
from ..likelihood import log_likelihood
from ..sampling import sample


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
            res = log_likelihood(model, y, sde, generator=g, **likelihood_kwargs)
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


def main(argv: Sequence[str] | None = None) -> int:
    from ..data import digits
    from .train import load_checkpoint

    p = argparse.ArgumentParser(prog="python -m scoresolve.models.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--bpd-n", type=int, default=200, help="held-out images for bits/dim (0: skip)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--probes", type=int, default=1)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--repeats", type=int, default=1, help="dequantization draws per image")
    p.add_argument("--grid", default="", help="PNG of 64 samples: dpmpp_2m (20 NFE) and dopri5")
    p.add_argument("--grid-rtol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, sde, config = load_checkpoint(args.checkpoint)
    if args.grid:
        x_T = sde.prior_sample((64, 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
        a = sample(model, sde, x_T, solver="dpmpp_2m", nfe=20)
        b = sample(model, sde, x_T, solver="dopri5", rtol=args.grid_rtol, atol=args.grid_rtol)
        nfe_b = float(b.nfe.double().mean()) if torch.is_tensor(b.nfe) else float(b.nfe)
        test = digits("test", seed=config.split_seed)[:64]
        panels = [("held-out data", test), ("dpmpp_2m, 20 NFE", a.x)]
        panels.append((f"dopri5 rtol={args.grid_rtol:g}, NFE {nfe_b:.0f}", b.x))
        save_sample_grids(panels, args.grid)
        print(f"sample grid written to {args.grid}")
    if args.bpd_n > 0:
        x = digits("test", seed=config.split_seed)[: args.bpd_n]
        res = dequantized_bpd(model, sde, x, repeats=args.repeats, batch_size=args.batch_size, seed=args.seed,
                              probes=args.probes, rtol=args.rtol, atol=args.atol)
        print(
            f"bits/dim on {x.shape[0]} held-out digits (17 levels, uniform dequantization, {args.repeats} draw(s), "
            f"{args.probes} Hutchinson probe(s), dopri5 rtol={args.rtol:g} atol={args.atol:g}): "
            f"{res.mean:.4f} +- {res.std_error:.4f}  (mean NFE {res.nfe_mean:.0f}, {res.seconds:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
