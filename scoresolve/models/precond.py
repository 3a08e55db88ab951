"""EDM's preconditioning of a denoiser network (Karras et al. 2022, Table 1), as the PFGM++ reference trains with.

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = log(sigma) / 4.

The loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2 makes
lambda |D - y|^2 = |F - (y - c_skip x) / c_out|^2: the raw network F has a unit-variance target at every sigma.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .mlp import batch_time


class EDMPrecond(nn.Module):
    """``D(x, sigma)``: the denoiser (x0 prediction) built from ``net(x_in, c_noise)`` (module docstring).

    Args:
        net: the raw network ``F(x, t)`` (a `UNet` or `MLPScoreNet`), given c_noise = log(sigma) / 4 as its time
            input (build it with ``T=1``).
        sigma_data: the data's standard deviation in EDM's formulas (0.5: EDM's and the PFGM++ reference's choice).

    ``sigma`` is a scalar or ``[batch]`` (> 0); the answer has x's shape and dtype.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (any shape)."""
        sd2 = self.sigma_data**2
        s2 = sigma * sigma
        root = torch.sqrt(s2 + sd2)
        return sd2 / (s2 + sd2), sigma * self.sigma_data / root, 1 / root, torch.log(sigma) / 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = batch_time(sigma, x)
        if bool((sigma <= 0).any()):
            raise ValueError("the preconditioned denoiser needs sigma > 0")
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(sigma))
        f = self.net(c_in * x, c_noise.flatten())
        return c_skip * x + c_out * f.to(x.dtype)
