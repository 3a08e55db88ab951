"""Sample grids of a trained image model (`save_sample_grids`); `scoresolve evaluate` adds bits/dim on held-out
digits (`scoresolve.quantization.dequantized_bpd`).

    scoresolve evaluate --checkpoint scoresolve/models/checkpoints/digits_vp.pt --bpd-n 200 --grid digits_samples.png

(or ``python -m scoresolve evaluate`` with the same options; the command lives in `scoresolve.cli.evaluate`).

Bits/dim: each held-out image is uniformly dequantized on its 17 levels, its log-density is computed with
[`scoresolve.log_likelihood`][scoresolve.log_likelihood] (probability-flow ODE, Hutchinson divergence, per-sample
adaptive dopri5) and converted with [`scoresolve.quantization.bits_per_dim`][scoresolve.quantization.bits_per_dim]
(offset log2(17 / 2)); ``--dequantization truncnorm|variational`` and ``--iw N`` take another q(u | i) of
`scoresolve.quantization.dequantizers` and report the variational bound, and with several draws per image the
importance-weighted one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


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
